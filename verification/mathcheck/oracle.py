"""The equivalence oracle: are two final answers mathematically the same?

Equivalence is decided by math-verify. It bounds its own time with ``signal.alarm`` (main thread
only) and raises when called from other threads, and some inputs make sympy run for ever
(``2^{2^{2^{100}}}`` compared with a number). So math-verify runs with its timeouts disabled in a
separate worker *process* (``worker.py``); the parent bounds every call and kills/restarts the
worker when a call overruns. A timeout counts as "not equivalent". See docs/verification.md.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Self

from cachetools import LRUCache

from streams import metrics
from verification.mathcheck.answers import GARBLED_RE, PLAIN_NUMBER_RE, answer_key
from verification.mathcheck.settings import MathCheckSettings

log = logging.getLogger(__name__)

# How a check's verdict was reached (the outcome label of promptcot_math_oracle_calls_total):
# normalized text or exact numbers, the cache, too long to parse, garbled (a control character
# or U+FFFD: identical text only), math-verify in the worker; or "not equivalent" because the
# worker overran the timeout or died under the pair, because the pair shares an answer with one
# that did in the same call (hostile), or because the vote's budget was spent.
TEXT, CACHE, TOO_LONG, GARBLED, MATH_VERIFY = "text", "cache", "too_long", "garbled", "math_verify"
TIMEOUT, CRASHED, HOSTILE, OVER_BUDGET = "timeout", "crashed", "hostile", "over_budget"
_OUTCOMES = (TEXT, CACHE, TOO_LONG, GARBLED, MATH_VERIFY, TIMEOUT, CRASHED, HOSTILE, OVER_BUDGET)
_OVERRUNS = (TIMEOUT, CRASHED)  # the worker is killed; the pair's answers are suspect
_UNDECIDED = (HOSTILE, OVER_BUDGET)  # never asked: not cached
# Children bound once: .labels() per check would cost more than a cache hit's lookup.
_CALLS = {outcome: metrics.MATH_ORACLE_CALLS.labels(outcome=outcome) for outcome in _OUTCOMES}


class Budget:
    """Seconds of waiting for the worker that a group of checks (one vote) may still spend."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    @property
    def spent(self) -> bool:
        return self.left <= 0


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
# The worker process (worker.py) and its socket


class WorkerStartError(RuntimeError):
    """The math-verify worker process could not be started."""


# Own process + socket, not pebble's pool: 0.10 vs 0.27 ms a round trip (docs/verification.md)
class _Worker:
    """One child process and its socket; not thread-safe (the oracle holds a lock)."""

    def __init__(self, start_timeout_s: float) -> None:
        parent_sock, child_sock = socket.socketpair()
        package_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = "import sys; from verification.mathcheck.worker import main; main(int(sys.argv[1]))"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            parent_sock.close()
            raise WorkerStartError(f"cannot spawn the math-verify worker: {exc}") from exc
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        if not self.conn.poll(start_timeout_s):
            self.close()
            raise WorkerStartError(f"math-verify worker not ready after {start_timeout_s} s")
        try:
            ready = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise WorkerStartError("math-verify worker died while starting") from exc
        if ready != ("ready",):
            self.close()
            raise WorkerStartError(f"unexpected worker greeting {ready!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


class EquivalenceOracle:
    """Mathematical equivalence of answers, bounded per check, cached, safe to share by threads.

    >>> with EquivalenceOracle() as oracle:
    ...     oracle.equivalent("0.5", "\\\\frac{1}{2}")
    True

    The worker process starts lazily on the first check that needs math-verify (identical
    normalized text and exact plain numbers never do). Each check may take at most
    ``equivalence_timeout_s``; on overrun the worker is killed (and restarted on the next need)
    and the pair counts as not equivalent. Verdicts, timeouts included, are cached.

    Every check counts in ``promptcot_math_oracle_calls_total{outcome}``, every overrun in
    ``promptcot_math_oracle_timeouts_total`` (streams/metrics.py) and in ``timeouts``.
    """

    def __init__(self, settings: MathCheckSettings | None = None) -> None:
        self.settings = settings or MathCheckSettings()
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        # Normalized pair -> verdict; guarded by _lock (LRUCache is not thread-safe).
        self._cache: LRUCache[tuple[str, str], bool] | None = (
            LRUCache(maxsize=self.settings.cache_size) if self.settings.cache_size else None
        )
        self.timeouts = 0  # checks that hit equivalence_timeout_s
        self.crashes = 0  # checks whose worker died under them
        self.worker_starts = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def equivalent(self, a: str, b: str) -> bool:
        return self.equivalent_many([(a, b)])[0]

    def budget(self) -> Budget:
        """A fresh ``vote_budget_s`` for the checks of one vote."""
        return Budget(self.settings.vote_budget_s)

    def equivalent_many(
        self, pairs: Sequence[tuple[str, str]], budget: Budget | None = None
    ) -> list[bool]:
        """Verdicts for many pairs with one round trip to the worker (results stream back).

        After a pair overruns, the call's pairs sharing an answer with it are not asked (they
        would overrun too: 23 worker restarts for one vote of power towers, issue 21); with a
        ``budget``, waiting for the worker spends it and pairs past it are not asked. Both are
        "not equivalent", like the overrun itself, and not cached.

        Raises WorkerStartError only if a needed worker cannot start (an infrastructure
        failure the caller should retry, not a verdict).
        """
        verdicts: list[bool | None] = []
        outcomes: dict[str, int] = {}
        pending: dict[tuple[str, str], list[int]] = {}
        try:
            with self._lock:
                for i, (a, b) in enumerate(pairs):
                    key = self._key(a, b)
                    verdict, outcome = _fast_verdict(*key), TEXT
                    if verdict is None:
                        verdict, outcome = self._cache_get(key), CACHE
                    if verdict is None and max(map(len, key)) > self.settings.max_answer_chars:
                        verdict, outcome = False, TOO_LONG  # not a final answer: identical only
                    if verdict is None and any(GARBLED_RE.search(k) for k in key):
                        verdict, outcome = False, GARBLED  # math-verify reads 2 in "1\ufffd 2"
                    verdicts.append(verdict)
                    if verdict is None:
                        pending.setdefault(key, []).append(i)
                    else:
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if pending:
                    keys = list(pending)
                    answers = self._ask_worker(keys, budget)
                    for key, (verdict, outcome) in zip(keys, answers, strict=True):
                        if outcome not in _UNDECIDED:
                            self._cache_put(key, verdict)
                        outcomes[outcome] = outcomes.get(outcome, 0) + len(pending[key])
                        for i in pending[key]:
                            verdicts[i] = verdict
        finally:
            for outcome, n in outcomes.items():
                _CALLS[outcome].inc(n)
        return [bool(v) for v in verdicts]

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        na, nb = answer_key(a), answer_key(b)
        return (na, nb) if na <= nb else (nb, na)  # equivalence is symmetric: one cache entry

    def _cache_get(self, key: tuple[str, str]) -> bool | None:
        return None if self._cache is None else self._cache.get(key)

    def _cache_put(self, key: tuple[str, str], verdict: bool) -> None:
        if self._cache is not None:
            self._cache[key] = verdict  # evicts the least recently used beyond cache_size

    def _ask_worker(
        self, keys: list[tuple[str, str]], budget: Budget | None = None
    ) -> list[tuple[bool, str]]:
        """(verdict, outcome) per pair: each verdict awaited at most the timeout (and what is
        left of ``budget``); on overrun or crash the worker is killed, the pairs sharing an
        answer with that pair are not asked, and the rest go to a new worker."""
        results: list[tuple[bool, str] | None] = [None] * len(keys)
        suspect: set[str] = set()  # answers of a pair that overran in this call
        try:
            while True:
                ask = []
                for i, key in enumerate(keys):
                    if results[i] is not None:
                        continue
                    if suspect.intersection(key):
                        results[i] = (False, HOSTILE)
                    elif budget is not None and budget.spent:
                        results[i] = (False, OVER_BUDGET)
                    else:
                        ask.append(i)
                if not ask:
                    return results  # type: ignore[return-value] - every slot is filled
                worker = self._ensure_worker()
                if worker.proc.poll() is not None:  # died since the last call (e.g. OOM-killed)
                    self._drop_worker()
                    worker = self._ensure_worker()
                try:
                    worker.conn.send(("pairs", [keys[i] for i in ask]))
                except OSError:  # died between the poll and the send: a new worker takes them
                    self._drop_worker()
                    continue
                for offset, i in enumerate(ask):
                    verdict, outcome = self._receive(worker, offset, budget)
                    results[i] = (verdict, outcome)
                    if outcome != MATH_VERIFY:  # this pair is "not equivalent"
                        log.warning(
                            "equivalence check abandoned (%s): %.80r vs %.80r", outcome, *keys[i]
                        )
                        if outcome == TIMEOUT:
                            self.timeouts += 1
                            metrics.MATH_ORACLE_TIMEOUTS.inc()
                        elif outcome == CRASHED:
                            self.crashes += 1
                        if outcome in _OVERRUNS:
                            suspect.update(keys[i])
                        self._drop_worker()
                        break
        except BaseException:
            # Interrupted mid-exchange (KeyboardInterrupt, a send error...): unread verdicts
            # would be taken for the next batch's, so this worker cannot be reused.
            self._drop_worker()
            raise

    def _receive(
        self, worker: _Worker, expected_index: int, budget: Budget | None
    ) -> tuple[bool, str]:
        wait, limit = self.settings.equivalence_timeout_s, TIMEOUT
        if budget is not None and budget.left < wait:
            wait, limit = max(0.0, budget.left), OVER_BUDGET
        started = time.monotonic()
        try:
            if not worker.conn.poll(wait):
                return False, limit
            index, verdict = worker.conn.recv()
        except (EOFError, OSError):
            return False, CRASHED
        finally:
            if budget is not None:
                budget.left -= time.monotonic() - started
        if index != expected_index:  # protocol desync should be impossible; be safe
            return False, CRASHED
        return bool(verdict), MATH_VERIFY

    def _ensure_worker(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(self.settings.worker_start_timeout_s)
            self.worker_starts += 1
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
