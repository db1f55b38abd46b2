"""/healthz and /readyz (streams/health.py) next to /metrics, through real HTTP requests.

Liveness means the process answers and its event loop runs callbacks; readiness means the
runtime started its stages and no stage holds pending input without progress for
``stall_after_s``. The progress gauges are set here the way the runtime sets them.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from streams import metrics
from streams.health import HEALTH, start_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server():
    metrics.PENDING.clear()
    metrics.LAST_PROGRESS.clear()
    HEALTH.loop, HEALTH.started_at, HEALTH.stopping = None, None, False
    port = _free_port()
    srv = start_server("127.0.0.1", port)
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()
    srv.server_close()
    HEALTH.loop, HEALTH.started_at, HEALTH.stopping = None, None, False
    metrics.PENDING.clear()
    metrics.LAST_PROGRESS.clear()


@pytest.fixture
def loop():
    """An event loop running in a thread, as the worker's loop runs beside the HTTP thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_metrics_are_still_served(server):
    metrics.PENDING.labels(stage="verify").set(2)
    status, body = _get(server, "/metrics")
    assert status == 200 and 'promptcot_stage_pending_records{stage="verify"} 2.0' in body


def test_not_ready_until_the_stages_run_and_not_after(server, loop):
    assert _get(server, "/readyz") == (503, "starting: stages not running yet\n")
    assert _get(server, "/healthz") == (200, "ok: process answers\n")
    HEALTH.started(loop, stall_after_s=600, loop_timeout_s=5)
    assert _get(server, "/readyz") == (200, "ok: making progress\n")
    HEALTH.stopped()
    assert _get(server, "/readyz") == (503, "stopping\n")


def test_liveness_fails_while_the_event_loop_is_blocked(server, loop):
    HEALTH.started(loop, stall_after_s=600, loop_timeout_s=0.5)
    assert _get(server, "/healthz") == (200, "ok: event loop responsive\n")
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait)  # blocks the loop until released
    try:
        assert _get(server, "/healthz") == (
            503,
            "event loop blocked: no callback ran within 0.5 s\n",
        )
    finally:
        release.set()
    assert _get(server, "/healthz") == (200, "ok: event loop responsive\n")


def test_readiness_fails_when_pending_input_makes_no_progress(server, loop):
    HEALTH.started(loop, stall_after_s=600, loop_timeout_s=5)
    HEALTH.started_at = time.time() - 7200  # the runtime started two hours ago
    now = time.time()
    metrics.PENDING.labels(stage="verify").set(3)
    metrics.LAST_PROGRESS.labels(stage="verify").set(now - 1000)
    metrics.PENDING.labels(stage="sink").set(0)  # idle: no work is not a stall
    metrics.LAST_PROGRESS.labels(stage="sink").set(now - 5000)
    status, body = _get(server, "/readyz")
    assert status == 503 and body.startswith("stalled: verify (3 pending, no progress for 10")
    assert "sink" not in body

    metrics.LAST_PROGRESS.labels(stage="verify").set(time.time())  # a batch finished
    assert _get(server, "/readyz") == (200, "ok: making progress\n")


def test_a_stage_that_never_progressed_counts_from_the_start(server, loop):
    HEALTH.started(loop, stall_after_s=600, loop_timeout_s=5)
    metrics.PENDING.labels(stage="generate").set(8)  # first batch in a model call, no progress
    assert _get(server, "/readyz")[0] == 200  # just started: not stalled yet
    HEALTH.started_at = time.time() - 700
    status, body = _get(server, "/readyz")
    assert status == 503 and "generate (8 pending" in body
