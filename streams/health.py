"""The HTTP endpoint of a worker process (``serve``): /metrics, its Prometheus registry
(streams/metrics.py), and beside it liveness and readiness.

- ``/healthz`` (liveness): the process answers, and once the runtime runs, its event loop runs
  a callback within ``metrics.loop_timeout_s``. A blocked loop stops heartbeats and commits:
  restarting the process is the cure.
- ``/readyz`` (readiness): the runtime has started its stages, and no stage holds pending input
  (``promptcot_stage_pending_records`` > 0) without progress
  (``promptcot_stage_last_progress_timestamp_seconds``) for ``metrics.stall_after_s``. A stage
  that never finished anything counts from the start of the runtime.

Both answer 200 or 503 with one line of text that says why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

from streams import metrics

log = logging.getLogger(__name__)


def _by_stage(gauge) -> dict[str, float]:
    return {
        sample.labels["stage"]: sample.value
        for family in gauge.collect()
        for sample in family.samples
    }


@dataclass
class Health:
    """The health of this process: one instance per process (``HEALTH``), like the registry."""

    loop: asyncio.AbstractEventLoop | None = None
    started_at: float | None = None  # unix time the runtime started its stages
    stopping: bool = False
    stall_after_s: float = 900.0
    loop_timeout_s: float = 5.0

    def started(
        self, loop: asyncio.AbstractEventLoop, *, stall_after_s: float, loop_timeout_s: float
    ) -> None:
        """The runtime has started its stages on ``loop``: setup is done."""
        self.loop, self.started_at, self.stopping = loop, time.time(), False
        self.stall_after_s, self.loop_timeout_s = stall_after_s, loop_timeout_s

    def stopped(self) -> None:
        self.loop, self.stopping = None, True

    def live(self) -> tuple[bool, str]:
        loop = self.loop
        if loop is None or loop.is_closed():
            return True, "ok: process answers"
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # closed between the check and the call
            return True, "ok: process answers"
        if not answered.wait(self.loop_timeout_s):
            return False, f"event loop blocked: no callback ran within {self.loop_timeout_s:g} s"
        return True, "ok: event loop responsive"

    def ready(self, now: float | None = None) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if self.started_at is None:
            return False, "starting: stages not running yet"
        now = time.time() if now is None else now
        progress = _by_stage(metrics.LAST_PROGRESS)
        stalled = []
        for stage, pending in sorted(_by_stage(metrics.PENDING).items()):
            if pending <= 0:
                continue
            idle = now - max(progress.get(stage, 0.0), self.started_at)
            if idle > self.stall_after_s:
                stalled.append(f"{stage} ({pending:g} pending, no progress for {idle:.0f} s)")
        if stalled:
            return False, "stalled: " + ", ".join(stalled)
        return True, "ok: making progress"


HEALTH = Health()

_ROUTES = {"/healthz": Health.live, "/readyz": Health.ready}


def wsgi(metrics_app, health: Health = HEALTH):
    """A WSGI app: /healthz and /readyz from ``health``, every other path to ``metrics_app``."""

    def app(environ, start_response):
        check = _ROUTES.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics_app(environ, start_response)
        ok, text = check(health)
        body = (text + "\n").encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


_server_started = False


def serve(host: str, port: int) -> int | None:
    """Start the /metrics, /healthz and /readyz endpoint once per process; port 0 disables it."""
    global _server_started
    if port == 0 or _server_started:
        return None
    try:
        start_server(host, port)
    except OSError as exc:  # a second worker on the same machine: say so, keep working
        log.warning("metrics endpoint %s:%s not started: %s", host, port, exc)
        return None
    _server_started = True
    return port


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


def start_server(host: str, port: int) -> WSGIServer:
    """Serve /metrics (this process's registry) and the health checks on a daemon thread; the
    caller may ``shutdown()`` the returned server."""
    server = make_server(
        host,
        port,
        wsgi(make_wsgi_app(REGISTRY)),
        server_class=_Server6 if ":" in host else _Server,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
