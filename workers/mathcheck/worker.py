"""What runs inside the oracle's worker process: math-verify with its own timeouts disabled.

math-verify bounds its time with ``signal.alarm`` (main thread only) and raises when called
from other threads, so both of its timeouts are off here (``parsing_timeout=None``,
``timeout_seconds=None``); the parent bounds every call at the process level instead
(``oracle.py``, docs/verification.md). Functions here are called by the pebble pool: ``start``
once per worker process, then ``ready`` and ``equivalent`` as tasks.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from functools import lru_cache

# One pair per kind of math sympy imports lazily (simplification, sets, intervals, matrices,
# units...): cold, the first check of each kind takes 0.1-1.2 s and would eat the per-check
# budget (docs/verification.md). Startup has its own bound.
WARMUP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("t^2+2t+1", "(t+1)^2"),
    ("t^3-1", "(t-1)(t^2+t+1)"),
    ("(1,2)", "\\{1,2\\}"),
    ("[0,1)", "(0,1]"),
    ("t=3", "3"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("10\\%", "0.1"),
    ("\\pi", "3"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "(1,2)"),
    ("7\\text{ cm}", "\\$7"),
)

_same: Callable[[str, str], bool] | None = None


def start() -> None:
    """Pool initializer: import math-verify and warm sympy up (once per worker process)."""
    global _same
    # pebble stops an overrunning worker with SIGTERM and waits 3 s before SIGKILL; its Python
    # handler cannot run while sympy is inside one long C call, the default action ends us now.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=8192)
    def parsed(answer: str) -> tuple:
        # Boxing makes the whole answer the extraction target, not some number inside it.
        return tuple(
            parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)
        )

    def same(a: str, b: str) -> bool:
        try:
            pa, pb = list(parsed(a)), list(parsed(b))
            if not pa or not pb:
                return False
            # verify() is asymmetric (gold vs prediction); equivalence here is symmetric.
            return bool(
                verify(pa, pb, timeout_seconds=None) or verify(pb, pa, timeout_seconds=None)
            )
        except Exception:  # noqa: BLE001 -- sympy raises a zoo of types on odd input
            return False

    for a, b in WARMUP_PAIRS:
        same(a, b)
    _same = same


def ready() -> int:
    """The worker's pid, once ``start`` has run: the parent's startup probe."""
    return os.getpid()


def equivalent(a: str, b: str) -> tuple[int, bool]:
    """(pid of this worker, whether a and b are mathematically equivalent)."""
    if _same is None:  # not started by a pool initializer (direct use)
        start()
    return os.getpid(), _same(a, b)
