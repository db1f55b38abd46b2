"""The equivalence oracle: are two final answers mathematically the same?

Equivalence is decided by math-verify. It bounds its own time with ``signal.alarm`` (main thread
only) and raises when called from other threads, and some inputs make sympy run for ever
(``2^{2^{2^{100}}}`` compared with a number). So math-verify runs with its timeouts disabled in a
separate worker *process* (``worker.py``), a one-process pebble ``ProcessPool``: every check is
one pool task with the per-check timeout; on overrun pebble stops the worker and starts a new
one, and the pair counts as "not equivalent". See docs/verification.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Self

from pebble import ProcessPool

from workers.mathcheck import worker
from workers.mathcheck.answers import PLAIN_NUMBER_RE, as_text, normalize_answer
from workers.mathcheck.settings import MathCheckSettings

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The exact fast path

_INT_RE = re.compile(r"^[+-]?\d+$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{(\d+)\}$|^([+-]?\d+)/(\d+)$")


def _exact_value(s: str) -> Fraction | None:
    """Exact value of a plain number or integer fraction; None for anything else."""
    if len(s) > 64:  # Fraction of a huge literal is cheap, but keep the fast path trivial
        return None
    if PLAIN_NUMBER_RE.match(s):
        return Fraction(s)
    m = _FRAC_RE.match(s)
    if m:
        sign, num, den = (
            (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        )
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _fast_verdict(a: str, b: str) -> bool | None:
    """Decide without math-verify when the answer is certain; None means 'ask the worker'."""
    if a == b:
        return True
    va, vb = _exact_value(a), _exact_value(b)
    if va is None or vb is None:
        return None
    if va == vb:
        return True
    # Distinct integers are certainly different; for decimals math-verify's rounding
    # (0.333333 == 1/3) decides, so those still go to the worker.
    if _INT_RE.match(a) and _INT_RE.match(b):
        return False
    return None


# --------------------------------------------------------------------------------------------
# The worker pool

# A fresh interpreter per worker, as a subprocess would be: forking a parent that runs threads
# (faust, aiokafka, torch) can deadlock the child.
_SPAWN = multiprocessing.get_context("spawn")
# A stopped worker is gone within pebble's check period (0.1 s) plus the kill; past this margin
# over the timeouts a task is stuck in a broken pool, not in math-verify.
_STOP_MARGIN_S = 5.0
# How a check ended without a verdict from math-verify.
_TIMEOUT, _CRASHED = "timeout", "crashed"


class WorkerStartError(RuntimeError):
    """The math-verify worker process could not be started."""


def _stop(pool: ProcessPool) -> None:
    pool.stop()
    pool.join()


class EquivalenceOracle:
    """Mathematical equivalence of answers, bounded per check, cached, safe to share by threads.

    >>> with EquivalenceOracle() as oracle:
    ...     oracle.equivalent("0.5", "\\\\frac{1}{2}")
    True

    The worker process starts lazily on the first check that needs math-verify (identical
    normalized text and exact plain numbers never do). Each check may take at most
    ``equivalence_timeout_s``; on overrun the worker is stopped (the pool starts another) and
    the pair counts as not equivalent. Verdicts, timeouts included, are cached.
    """

    def __init__(self, settings: MathCheckSettings | None = None) -> None:
        self.settings = settings or MathCheckSettings()
        self._lock = threading.Lock()  # the cache and the counters
        # The pool and its one worker: one batch at a time (the worker runs them in turn
        # anyway), so waiting for a task never includes another thread's tasks.
        self._worker_lock = threading.Lock()
        self._pool: ProcessPool | None = None
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self.timeouts = 0  # checks that hit equivalence_timeout_s
        self.crashes = 0  # checks whose worker died under them
        self.pool_starts = 0
        self.worker_pid: int | None = None  # the worker that gave the last verdict
        self._worker_pids: set[int] = set()

    @property
    def worker_starts(self) -> int:
        """Worker processes that have answered so far (each restart after an overrun adds one)."""
        return len(self._worker_pids)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._worker_lock:
            self._drop_pool()

    def equivalent(self, a: str, b: str) -> bool:
        return self.equivalent_many([(a, b)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Verdicts for many pairs; those math-verify must decide are queued to the worker at once.

        Raises WorkerStartError only if a needed worker cannot start (an infrastructure
        failure the caller should retry, not a verdict).
        """
        keys = [self._key(a, b) for a, b in pairs]
        verdicts: list[bool | None] = [_fast_verdict(*key) for key in keys]
        pending: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                if verdicts[i] is None:
                    verdicts[i] = self._cache_get(key)
                if verdicts[i] is None and max(map(len, key)) > self.settings.max_answer_chars:
                    verdicts[i] = False  # too long to be a final answer: identical text only
                if verdicts[i] is None:
                    pending.setdefault(key, []).append(i)
        if pending:
            asked = list(pending)
            answers = self._ask_worker(asked)
            with self._lock:
                for key, verdict in zip(asked, answers, strict=True):
                    self._cache_put(key, verdict)
                    for i in pending[key]:
                        verdicts[i] = verdict
        return [bool(v) for v in verdicts]

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        na, nb = normalize_answer(as_text(a)), normalize_answer(as_text(b))
        return (na, nb) if na <= nb else (nb, na)  # equivalence is symmetric: one cache entry

    def _cache_get(self, key: tuple[str, str]) -> bool | None:
        verdict = self._cache.get(key)
        if verdict is not None:
            self._cache.move_to_end(key)
        return verdict

    def _cache_put(self, key: tuple[str, str], verdict: bool) -> None:
        if self.settings.cache_size <= 0:
            return
        self._cache[key] = verdict
        if len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)

    def _ask_worker(self, keys: list[tuple[str, str]]) -> list[bool]:
        """One pool task per pair, each bounded by the timeout; the worker runs them in order.

        A pool that broke under its tasks (its idle worker was killed, e.g. by the OOM killer)
        is replaced once and the unanswered pairs asked again.
        """
        verdicts: dict[int, bool] = {}
        todo = list(range(len(keys)))
        with self._worker_lock:
            for _attempt in range(2):
                pool = self._ensure_pool()
                timeout = self.settings.equivalence_timeout_s
                futures: list[tuple[int, Future]] = []
                try:
                    for i in todo:
                        try:
                            task = pool.schedule(worker.equivalent, keys[i], timeout=timeout)
                        except RuntimeError:  # the pool broke since _ensure_pool
                            break
                        futures.append((i, task))
                    for i, future in futures:
                        self._settle(i, keys[i], future, verdicts)
                except BaseException:
                    # Interrupted or stuck: tasks of this batch may still be queued in the
                    # pool, and cancelling them one by one would stop the worker for each.
                    self._drop_pool()
                    raise
                todo = [i for i in todo if i not in verdicts]
                if not todo:
                    return [verdicts[i] for i in range(len(keys))]
                self._drop_pool()
        raise WorkerStartError("the math-verify worker pool broke twice in a row")

    def _settle(
        self, i: int, key: tuple[str, str], future: Future, verdicts: dict[int, bool]
    ) -> None:
        """Wait for one task and record its verdict; no verdict if its pool broke under it."""
        bound = (
            self.settings.worker_start_timeout_s
            + self.settings.equivalence_timeout_s
            + _STOP_MARGIN_S
        )
        try:
            error = future.exception(timeout=bound)  # pebble's timeout ends it sooner
        except TimeoutError as exc:
            raise WorkerStartError(f"no verdict from the math-verify worker in {bound} s") from exc
        if error is None:
            pid, verdict = future.result()
            with self._lock:
                self.worker_pid = pid
                self._worker_pids.add(pid)
            verdicts[i] = verdict
            return
        if isinstance(error, BrokenProcessPool):
            return
        # Overran (pebble's TimeoutError) or crashed (ProcessExpired...): "not equivalent".
        outcome = _TIMEOUT if isinstance(error, TimeoutError) else _CRASHED
        log.warning("equivalence check abandoned (%s): %.80r vs %.80r", outcome, *key)
        with self._lock:
            if outcome == _TIMEOUT:
                self.timeouts += 1
            else:
                self.crashes += 1
        verdicts[i] = False

    def _ensure_pool(self) -> ProcessPool:
        """The pool, started (or replaced if it broke since the last call); holds _worker_lock."""
        if self._pool is not None and not self._pool.active:
            self._drop_pool()
        if self._pool is None:
            self._pool = self._start_pool()
        return self._pool

    def _start_pool(self) -> ProcessPool:
        """A one-worker pool whose worker has imported and warmed math-verify, or raise."""
        pool = ProcessPool(max_workers=1, initializer=worker.start, context=_SPAWN)
        timeout = self.settings.worker_start_timeout_s
        try:
            pid = pool.schedule(worker.ready).result(timeout=timeout)
        except BaseException as exc:
            _stop(pool)
            if isinstance(exc, TimeoutError):
                raise WorkerStartError(f"math-verify worker not ready after {timeout} s") from exc
            if isinstance(exc, Exception):
                raise WorkerStartError(f"cannot start the math-verify worker: {exc!r}") from exc
            raise
        with self._lock:
            self.pool_starts += 1
            self._worker_pids.add(pid)
        return pool

    def _drop_pool(self) -> None:
        """Stop the pool, if any; holds _worker_lock."""
        pool, self._pool = self._pool, None
        if pool is not None:
            _stop(pool)
