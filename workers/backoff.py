"""Retrying what fails for reasons outside a record, the one way the stage runtime does it.

What fails because of the surroundings (a model server away, a full disk, a broker hiccup on a
send) is retried until it works or the worker stops, never dead-lettered: the delay starts at
``worker.retry_backoff_s`` and doubles after each failure up to ``worker.retry_backoff_max_s``
(docs/runtime.md). A worker that stops abandons the work in hand (``Stopped``): it was never
acknowledged, so it is redelivered to the next worker of the group.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workers.settings import WorkerSettings


class Stopped(Exception):
    """The worker is stopping: abandon this work (it will be redelivered)."""


class Backoff:
    """The delays of one retry loop: ``first``, then doubled after each failure, up to
    ``most``."""

    def __init__(self, first: float, most: float):
        self._delay = first
        self._most = most

    @classmethod
    def of(cls, worker: WorkerSettings) -> Backoff:
        return cls(worker.retry_backoff_s, worker.retry_backoff_max_s)

    def next(self) -> float:
        """The delay before the next try."""
        delay = self._delay
        self._delay = min(self._delay * 2, self._most)
        return delay


def pause(stopping: threading.Event, seconds: float) -> None:
    """Wait ``seconds`` in a worker thread; ``Stopped`` when the worker stops meanwhile."""
    if stopping.wait(seconds):
        raise Stopped()


async def keep_trying(
    attempt: Callable[[], Awaitable[object]],
    delays: Backoff,
    stopping: threading.Event,
    failed: Callable[[Exception, float], None],
) -> bool:
    """Await ``attempt()`` until it completes; after each failure, ``failed(error, delay)``
    (log it, count it), then wait ``delay``. False when the work was abandoned unfinished:
    ``attempt`` raised ``Stopped``, or failed while the worker is stopping."""
    while True:
        try:
            await attempt()
            return True
        except Stopped:
            return False
        except Exception as exc:
            delay = delays.next()
            failed(exc, delay)
            if stopping.is_set():
                return False
            await asyncio.sleep(delay)
