"""An asyncio event loop on a daemon thread of its own, for backends whose client is async (aiohttp
for OpenAI-compatible servers, vLLM's AsyncLLM): the stages call them from worker threads and
wait there for the loop's result, while the loop keeps every request of every caller in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from llm.backends.base import BackendError

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str, what: str):
        self.what = what  # "the OpenAI backend": how errors name the owner
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it in the calling thread."""
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise BackendError(f"{self.what} is closed")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        except concurrent.futures.CancelledError as exc:  # stop() while this call ran
            raise BackendError(f"{self.what} was closed during the call") from exc

    def stop(self, timeout_s: float) -> None:
        """Cancel the calls still running (their callers get a BackendError), stop the loop, and
        close it once its thread has ended (a call that ignores cancellation for ``timeout_s``
        keeps the loop, which dies with the process)."""
        if self.loop.is_closed():
            return

        def cancel_then_stop() -> None:
            task = self.loop.create_task(_cancel_pending())
            task.add_done_callback(lambda _: self.loop.stop())

        self.loop.call_soon_threadsafe(cancel_then_stop)
        self._thread.join(timeout=timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_pending() -> None:
    """Cancel every other task of the running loop and wait until they have ended."""
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Results in order, all submitted at once; the first error cancels the rest (an engine
    aborts a cancelled request) and is raised once they have ended."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
