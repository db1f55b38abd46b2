"""What runs inside the oracle's worker process: math-verify with its own timeouts disabled.

math-verify bounds its time with ``signal.alarm`` (main thread only) and raises when called
from other threads, so both of its timeouts are off here (``parsing_timeout=None``,
``timeout_seconds=None``); the parent bounds every call at the process level instead
(``oracle.py``, docs/verification.md).

Protocol on the socket inherited as ``fd``: the worker sends ``("ready",)`` once warmed up, then
answers each ``("pairs", [(a, b), ...])`` with one ``(index, bool)`` message per pair, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from multiprocessing.connection import Connection

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


def equivalence_check() -> Callable[[str, str], bool]:
    """math-verify's symmetric equivalence of two answers, parses cached; never raises."""
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

    return same


def main(fd: int) -> None:
    """Child entry point: warm up, say ready, then answer pairs until the parent goes away."""
    same = equivalence_check()
    for a, b in WARMUP_PAIRS:
        same(a, b)
    conn = Connection(fd)
    conn.send(("ready",))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if kind == "pairs":
            for index, (a, b) in enumerate(payload):
                conn.send((index, same(a, b)))
