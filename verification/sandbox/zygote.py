"""Host side of a slot's zygote: the sandboxed harness (``harness.py``) that a slot starts once
and then sends every solution to, instead of paying the sandbox and interpreter start-up per
solution. Each solution still gets fresh namespaces and fresh tmpfs mounts inside (the harness
forks per solution); see ``docs/sandbox.md``.

The exchange never blocks past its deadline: stdin is written and stdout/stderr are read through
one selector loop; a zygote that misses the deadline, closes its output, or breaks the protocol
is killed and replaced on the next request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass, field

from verification.sandbox.harness import frame
from verification.sandbox.runs import SandboxUnavailable

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 15.0
_STDERR_KEEP = 64 * 1024
# A clean environment for the whole chain, not only the program: an outer process keeps the
# environment it was started with.
CHAIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


@dataclass
class Exchange:
    """What came back for one request."""

    lines: list[bytes] = field(default_factory=list)  # result lines, without the end line
    end_code: int | None = None  # the "solution" process's exit code; None: no end line
    timed_out: bool = False
    overflow: bool = False  # more output than the cap
    stderr: bytes = b""  # the zygote's own diagnostics (never the program's)
    wall_time: float = 0.0

    @property
    def complete(self) -> bool:
        return self.end_code is not None and not self.timed_out and not self.overflow


class Zygote:
    """One running sandboxed harness. Not thread-safe: one slot uses it at a time."""

    def __init__(self, argv: list[str], init: dict[str, object], kind: str, cwd: str):
        self.kind = kind
        self.pids: frozenset[int] = frozenset()  # host pids of its idle processes (set by owner)
        self._stderr = b""
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            env=CHAIN_ENV,
        )
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._in, self._out, self._err = (
            self.proc.stdin.fileno(),
            self.proc.stdout.fileno(),
            self.proc.stderr.fileno(),
        )
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self._buffer = b""
        ready = self._exchange(
            frame(init),
            lambda line: line == b"ready",
            time.monotonic() + STARTUP_TIMEOUT_S,
            cap=1 << 16,
        )
        if ready.end_code is None:
            self.kill()
            reason = "timed out" if ready.timed_out else f"exit {self.proc.poll()}"
            raise SandboxUnavailable(
                f"the {kind} sandbox did not start ({reason}): "
                f"{ready.stderr[-2000:].decode(errors='replace')}"
            )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, message: bytes, nonce: bytes, deadline: float, cap: int) -> Exchange:
        """Send one solution; collect its result lines until the harness's end line."""
        end = nonce + b" end "
        self._stderr = b""  # this request's diagnostics only
        exchange = self._exchange(message, lambda line: line.startswith(end), deadline, cap)
        if exchange.end_code is not None:
            try:
                exchange.end_code = int(exchange.lines.pop()[len(end) :])
            except ValueError:
                exchange.end_code = None
        if self._buffer:  # nothing may follow the end line
            exchange.end_code = None
        return exchange

    def _exchange(self, message: bytes, is_end, deadline: float, cap: int) -> Exchange:
        start = time.monotonic()
        out = Exchange()
        pending = memoryview(message)
        size = 0
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._out, selectors.EVENT_READ)
            sel.register(self._err, selectors.EVENT_READ)
            if pending:
                sel.register(self._in, selectors.EVENT_WRITE)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    out.timed_out = True
                    break
                for key, _ in sel.select(min(left, 0.5)):
                    if key.fd == self._in:
                        try:
                            pending = pending[os.write(self._in, pending[: 1 << 16]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # the zygote is gone: its stdout ends too
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(self._in)
                        continue
                    try:
                        data = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(key.fd)
                        if key.fd == self._out:
                            out.stderr = self._stderr
                            out.wall_time = time.monotonic() - start
                            return out  # the zygote is gone
                        continue
                    if key.fd == self._err:
                        self._stderr = (self._stderr + data)[-_STDERR_KEEP:]
                        continue
                    size += len(data)
                    if size > cap:
                        out.overflow = True
                        break
                    self._buffer += data
                    *lines, self._buffer = self._buffer.split(b"\n")
                    for index, line in enumerate(lines):
                        out.lines.append(line)
                        if is_end(line):
                            out.end_code = 0
                            # anything after the end line is a protocol breach
                            rest = lines[index + 1 :]
                            if rest:
                                self._buffer = b"\n".join(rest) + b"\n" + self._buffer
                            break
                    if out.end_code is not None or out.overflow:
                        break
                if out.end_code is not None or out.overflow:
                    break
        finally:
            sel.close()
        out.stderr = self._stderr
        out.wall_time = time.monotonic() - start
        return out

    def close(self, timeout: float = 1.0) -> None:
        """End of input: the harness exits; killed if it does not within ``timeout``."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL its process group (the outer bwrap or harness; with it, by parent-death
        signal, the sandbox); the owner then kills whatever else runs under the slot uid."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("sandbox process %d did not die after SIGKILL", self.proc.pid)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
