"""Reworded benchmark problems: the judges of the decontamination gray zone.

A benchmark problem told in other words (new names and story, clauses reordered, numbers kept)
sits under the embedding threshold, typically at cosine 0.6-0.8. So a candidate whose nearest
benchmark item lies between ``judge.lower_bound`` and the threshold is paired with its top-k
benchmark neighbours in that band, and a judge says for each pair whether it is the same problem
(``vectorstore.dedup`` rejects it as ``benchmark_paraphrase`` when one is).

Two judges behind one interface (``PairJudge``):
- ``SkeletonJudge``, the cheap signal that runs on the embedded default with no model: a
  paraphrase keeps its numbers, so the candidate must name no number the benchmark item lacks and
  drop none it has (numbers read from digits, number words, simple fractions and ratios; 0, 1
  and 2 are ignored: "one", "both", "each other" come and go with the wording), and the shared
  numbers must be rare enough among the benchmark items to be evidence (``NumberRarity``).
  Measured on the paraphrase set (corpora/paraphrases/) and GSM8K train: docs/vectorstore.md.
- a model (the ``judge`` role, a teacher on a cluster: ``workers/judge.py``), which falls back to
  the cheap signal when its answer cannot be read.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from vectorstore.settings import JudgeSettings


@dataclass(frozen=True)
class JudgePair:
    """A candidate and one of its benchmark neighbours in the gray zone."""

    candidate: str
    benchmark_id: str  # e.g. "aime24:12"
    benchmark: str
    similarity: float  # cosine


@dataclass(frozen=True)
class PairVerdict:
    same: bool  # the same problem in other words
    judge: str  # who decided: "skeleton@v1", or the judge model's version
    detail: str = ""  # why, briefly (what the cheap signal saw, or the model's answer)
    template: str = ""  # the model judge's prompt template id
    malformed: bool = False  # the model's answer was unreadable: ``same`` is the cheap signal's


class PairJudge(Protocol):
    def judge(self, pairs: Sequence[JudgePair]) -> list[PairVerdict]:
        """One verdict per pair, in order. Must not raise on odd text."""
        ...


# --- the numbers of a problem -----------------------------------------------------------------

_CARDINALS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen", "twenty"),
)
_TENS = ("thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
# Ordinals and fraction words past "second" ("a third of", "the fifth day"); "first" and "second"
# also mean "earlier" and "a moment", so they are left out.
_ORDINALS = ("third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_WORD_VALUES: dict[str, Fraction] = {
    **{w: Fraction(i) for i, w in enumerate(_CARDINALS)},
    **{w: Fraction(30 + 10 * i) for i, w in enumerate(_TENS)},
    **{w: Fraction(3 + i) for i, w in enumerate(_ORDINALS)},
    **{f"{w}s": Fraction(3 + i) for i, w in enumerate(_ORDINALS)},
    "hundred": Fraction(100),
    "thousand": Fraction(1000),
    "dozen": Fraction(12),
    "dozens": Fraction(12),
    "twice": Fraction(2),
    "double": Fraction(2),
    "triple": Fraction(3),
    "half": Fraction(1, 2),
    "quarter": Fraction(1, 4),
    # A polygon's name is its number of sides ("a regular octagon" = "8 vertices").
    "quadrilateral": Fraction(4),
    "pentagon": Fraction(5),
    "hexagon": Fraction(6),
    "heptagon": Fraction(7),
    "octagon": Fraction(8),
    "nonagon": Fraction(9),
    "decagon": Fraction(10),
    "dodecagon": Fraction(12),
}
# \frac{1}{2}, \tfrac12, \dfrac{3}{4}, {1 \over 2}; a ratio 1:2 (not a clock time 1:00). No two
# unbounded quantifiers side by side, and a ratio starts where a digit run starts: linear time
# on any text (hostile text reaches every stage that reads completions).
_FRACTION = re.compile(
    r"\\[dt]?frac\s*\{?(\d{1,9})\}?\s*\{?(\d{1,9})\}?"
    r"|\{\s*(\d{1,9}) ?\\over ?(\d{1,9})\s*\}"
    r"|(?<!\d)(\d{1,9}) ?: ?([1-9]\d?)(?!\d)(?! ?[AaPp]\.?[Mm])"
)
_LONGEST_NUMBER = 24  # characters; a longer digit run is no quantity a rewording keeps
# LaTeX commands (skipped), numbers with thousands separators (1,000 and LaTeX's 6{,}000) and
# decimals, words.
_TOKEN = re.compile(r"\\[A-Za-z]+|\d+(?:(?:,|\{,\})\d{3})*(?:\.\d+)?|[A-Za-z]+")
# Too common in any wording to tell problems apart ("one of", "both", "each other").
_WORDING_NUMBERS = frozenset({Fraction(0), Fraction(1), Fraction(2)})


@functools.lru_cache(maxsize=4096)  # benchmark statements come back pair after pair
def problem_numbers(text: str) -> frozenset[Fraction]:
    """The quantities a problem states, as exact values: ``1,000`` = ``1000``, ``0.5`` =
    ``\\frac{1}{2}`` = ``half``, ``twelve`` = ``12``, ``octagon`` = ``8``."""
    text = unicodedata.normalize("NFKC", text)
    values: set[Fraction] = set()

    def fraction(match: re.Match) -> str:
        a, b = next((match.group(i), match.group(i + 1)) for i in (1, 3, 5) if match.group(i))
        if int(b):
            values.add(Fraction(int(a), int(b)))
        return " "

    text = _FRACTION.sub(fraction, text)
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0] == "\\":
            continue
        if token[0].isdigit():
            if len(token) <= _LONGEST_NUMBER:
                values.add(Fraction(token.replace("{,}", "").replace(",", "")))
        elif (value := _WORD_VALUES.get(token.lower())) is not None:
            values.add(value)
    return frozenset(values)


@dataclass(frozen=True)
class NumberDiff:
    new: frozenset[Fraction]  # in the candidate, not in the benchmark item
    missing: frozenset[Fraction]  # in the benchmark item, not in the candidate

    @property
    def same(self) -> bool:
        return not self.new and not self.missing

    def describe(self) -> str:
        if self.same:
            return "numbers: same"

        def show(values: frozenset[Fraction]) -> str:
            return ",".join(sorted(str(v) for v in values)[:6]) or "-"

        return f"numbers: new {show(self.new)}; missing {show(self.missing)}"


def number_diff(candidate: str, benchmark: str) -> NumberDiff:
    a = problem_numbers(candidate) - _WORDING_NUMBERS
    b = problem_numbers(benchmark) - _WORDING_NUMBERS
    return NumberDiff(frozenset(a - b), frozenset(b - a))


class NumberRarity:
    """How much it tells that two problems share a set of numbers: a number stated by a share p
    of the benchmark items is worth -log2(p) bits, a set the sum of its numbers. Sharing {3, 60}
    (common) is weak evidence of the same problem; sharing {80000, 50000, 150} is strong."""

    def __init__(self, texts: Iterable[str]):
        self.document_frequency: Counter[Fraction] = Counter()
        self.documents = 0
        for text in texts:
            self.document_frequency.update(problem_numbers(text) - _WORDING_NUMBERS)
            self.documents += 1

    def bits(self, values: Iterable[Fraction]) -> float:
        n = self.documents
        return sum(
            -math.log2((self.document_frequency[v] + 1) / (n + 2))
            for v in set(values) - _WORDING_NUMBERS
        )


# --- the cheap judge ----------------------------------------------------------------------------


class SkeletonJudge:
    """Same problem iff the two state the same numbers (``number_diff``) and those numbers are
    evidence enough (``NumberRarity.bits`` >= ``min_bits``). The pair reached the judge because
    its embedding is close (same topic, same story shape); what tells a paraphrase from a near
    miss is whether a quantity changed. It cannot see a different question asked about the same
    numbers: that takes the model judge."""

    name = "skeleton@v1"

    def __init__(self, rarity: NumberRarity, min_bits: float = 4.0):
        self.rarity = rarity
        self.min_bits = min_bits

    @classmethod
    def for_benchmarks(cls, texts: Iterable[str], settings: JudgeSettings) -> SkeletonJudge:
        """The judge for these benchmark statements (the numbers' rarity is counted on them)."""
        return cls(NumberRarity(texts), settings.min_number_bits)

    def evidence(self, pair: JudgePair) -> tuple[NumberDiff, float]:
        """What the verdict rests on: the number difference and the shared numbers' bits."""
        diff = number_diff(pair.candidate, pair.benchmark)
        shared = problem_numbers(pair.benchmark) if diff.same else set()
        return diff, self.rarity.bits(shared)

    def judge(self, pairs: Sequence[JudgePair]) -> list[PairVerdict]:
        out = []
        for pair in pairs:
            diff, bits = self.evidence(pair)
            same = diff.same and bits >= self.min_bits
            out.append(PairVerdict(same, self.name, f"{diff.describe()} ({bits:.1f} bits)"))
        return out


@dataclass(frozen=True)
class JudgedPair:
    """One pair the filter put to the judge, and the verdict (kept in the candidate's lineage)."""

    benchmark_id: str
    similarity: float
    verdict: PairVerdict
