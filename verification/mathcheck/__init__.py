"""Math verification: answer extraction, validity filters, equivalence oracle, majority voting.

One concern per module:

- ``answers``: the final answer of a solution (``extract_answer``) and its canonical text
  (``normalize_answer``);
- ``validity``: why a (problem, reference) is unfit for the dataset (``validity_issue``);
- ``oracle``: mathematical equivalence by math-verify in a bounded worker process, cached
  (``EquivalenceOracle``); ``worker``: what runs in that process;
- ``voting``: the majority answer by equivalence (``vote``, ``VoteResult``);
- ``settings``: the knobs (``MathCheckSettings``).

How answers are extracted and compared, the process model and the voting rules:
docs/verification.md.
"""

from verification.mathcheck.answers import extract_answer, normalize_answer
from verification.mathcheck.oracle import EquivalenceOracle, WorkerStartError
from verification.mathcheck.settings import MathCheckSettings
from verification.mathcheck.validity import validity_issue
from verification.mathcheck.voting import VoteResult, vote

__all__ = (
    "EquivalenceOracle",
    "MathCheckSettings",
    "VoteResult",
    "WorkerStartError",
    "extract_answer",
    "normalize_answer",
    "validity_issue",
    "vote",
)
