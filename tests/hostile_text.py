"""Hostile model text (issue 21): the inputs that froze a worker, wedged a partition or made two
answers one, shared by the tests that feed them to the stages that read model text
(tests/test_hostile_text.py through the broker, the fault suite's poison in
tests/fault_harness.py)."""

from __future__ import annotations

OPENERS = "\\(" * 100_000  # 200 KB of unclosed math openers: the lazy span regex took 75 s
BRACKETS = "(" * 5_000 + "[" * 5_000  # 10,000 unclosed brackets
TOWERS = [f"(10^{{10^{{{k}}}}})!" for k in range(3, 11)]  # eight distinct; each hangs sympy
SURROGATE = "half a character: \ud800"  # a lone surrogate: no encoder takes it
NUL = "1\x002"  # not 12

TEXTS = {
    "200 KB of \\(": OPENERS,
    "10,000 brackets": BRACKETS,
    "power towers": " or ".join(TOWERS),
    "a lone surrogate": SURROGATE,
    "NUL": NUL,
}
