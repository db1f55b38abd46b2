"""How `promptcot up` and `promptcot worker` stop. A first SIGTERM or SIGINT asks for a
graceful stop (the runtime drains and commits) within a deadline; a second signal, or the
deadline, ends the process at once: nothing is lost either way, since uncommitted input is
redelivered to the next run. A cluster that is gone (the embedded broker's process exited, or no
answer for ``kafka.unreachable_exit_s``) stops them with one line and a non-zero exit.

Signals are taken with ``signal.signal``, not the event loop's handler, and the deadline is a
thread: both work while the event loop is busy or stuck (docs/durability.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from streams.cluster import Cluster, ClusterUnreachable, check_reachable
from streams.settings import KafkaSettings

# Past the runtime's own drain (worker.shutdown_grace_s, then up to 5 s to commit and 5 s to
# stop the app, docs/runtime.md) a stop is forced: with the 20 s default, within the 30 s a
# cluster gives a pod between SIGTERM and SIGKILL.
STOP_MARGIN_S = 8.0
DEAD_CLUSTER_DEADLINE_S = 3.0  # nothing can drain into a dead broker: don't wait for it
PROBE_EVERY_S = 5.0
BROKER_CHECK_EVERY_S = 1.0  # a look at the embedded broker's process: no request
EXIT_CLUSTER_GONE = 3
CLIENT_LOGGERS = ("aiokafka", "kafka", "faust", "mode")
CONNECTION_WORDS = ("connect", "not ready", "closed")  # "connect call failed", "disconnected"


class Supervisor:
    """Install it first thing: a SIGTERM during start-up (a pod moved while loading models) is a
    stop like any other."""

    def __init__(self, kafka: KafkaSettings, grace_s: float, on_force: Callable[[], None]):
        self.kafka = kafka
        self.deadline_s = grace_s + STOP_MARGIN_S
        self.on_force = on_force  # prints what it can before the hard exit
        self.cluster: Cluster | None = None
        self.exit_code = 0
        self.failure: str | None = None
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_answer = time.monotonic()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def watch(self, cluster: Cluster) -> None:
        """Watch ``cluster`` from now on, from a thread: a configured one is probed, an
        embedded broker's process looked at. The thread stops the process even while the main
        thread is held by a start-up step (`up`'s cold start runs before any stage)."""
        self.cluster = cluster
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._client_errors)
        loop = self._probe_loop if cluster.broker is None else self._broker_loop
        threading.Thread(target=loop, daemon=True).start()

    def attach(self, stop: asyncio.Event) -> None:
        """Inside the event loop: a stop sets ``stop`` (at once if one was asked for already)."""
        self._stop = stop
        self._loop = asyncio.get_running_loop()
        if self._stopping:
            stop.set()

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._stopping:
            self.force()  # a second signal: the user wants out now
        self.stop(self.deadline_s)

    def stop(self, deadline_s: float) -> None:
        """Ask the factory to stop; if it has not within ``deadline_s``, end the process."""
        if self._stopping:
            return
        self._stopping = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        timer = threading.Timer(deadline_s, self.force)
        timer.daemon = True
        timer.start()

    def check_cluster(self, wait_s: float = 0.0) -> str | None:
        """One line if the cluster is gone (and stop with a non-zero exit), else None."""
        if self.failure is not None or self.cluster is None:
            return self.failure
        if self.cluster.broker is not None:
            self.failure = self.cluster.broker.exit_reason(wait_s)
        elif time.monotonic() - self._last_answer > self.kafka.unreachable_exit_s:
            self.failure = (
                f"cluster at {self.cluster.bootstrap} unreachable for "
                f"{self.kafka.unreachable_exit_s:g} s"
            )
        if self.failure is not None:
            self.failure = " ".join(self.failure.split())
            self.exit_code = EXIT_CLUSTER_GONE
            # The clients would log a reconnect error every 100 ms until the process ends: the
            # user reads our one line instead.
            logging.disable(logging.CRITICAL)
            threading.excepthook = lambda args: None  # the same, for the clients' threads
            self.stop(DEAD_CLUSTER_DEADLINE_S)
        return self.failure

    def _client_errors(self, record: logging.LogRecord) -> bool:
        """A log filter: once the cluster is gone, the clients' reconnect errors (one every
        100 ms) say nothing the one line does not. The first of them triggers the check, so none
        gets out ahead of that line."""
        if self.failure is not None:
            return False
        if record.name.split(".")[0] not in CLIENT_LOGGERS or record.levelno < logging.WARNING:
            return True
        # A dropped connection may be seen a moment before the broker's exit is: wait a little
        # for that, on connection errors only (any other wait here would stall the clients).
        text = record.getMessage().lower()
        wait_s = 0.2 if any(word in text for word in CONNECTION_WORDS) else 0.0
        return not self.check_cluster(wait_s)

    def _probe_loop(self) -> None:
        assert self.cluster is not None
        while not self._stopping:
            try:
                check_reachable(self.kafka, self.cluster.bootstrap, timeout_s=PROBE_EVERY_S)
                self._last_answer = time.monotonic()
            except ClusterUnreachable:
                pass
            time.sleep(PROBE_EVERY_S)

    def _broker_loop(self) -> None:
        while not self._stopping and not self.check_cluster():
            time.sleep(BROKER_CHECK_EVERY_S)

    def force(self) -> None:
        """End the process now: children first (the broker, its S3 server), then exit."""
        try:
            self.on_force()
            if self.failure is not None:
                print(f"error: {self.failure}", file=sys.stderr)
        finally:
            if self.cluster is not None:
                self.cluster.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exit_code)
