"""Drift of the accepted problems over a long run: the last N accepted problems of a domain, and
what long self-play runs are reported to drift towards (repetitive problems, artificially long
ones, problems that give their answer away, a designer the solver stops agreeing with).

Measures (the gauges of streams/metrics.py, set by the verify stage per domain):

- ``diversity``: mean pairwise cosine distance of the problems' hashed word-bigram count
  vectors (``vectorstore.diversity.mean_pairwise_distance``; 0 = all alike). Lexical, so the
  verify stage needs no embedding model; the filter's ``promptcot_diversity`` gauges measure
  the unique candidates with the embedder.
- ``mean_words``: mean length of the problems, in words.
- ``trivial_answer_share``: share of problems whose reference answer is 0 or 1, or a number the
  problem states itself (a copied answer).
- ``designer_agreement``: share of the problems with a designer's answer whose solver plurality
  agrees with that answer (None until one has).
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from vectorstore.diversity import mean_pairwise_distance

_DIMENSIONS = 1024  # hashed bigram features: collisions are rare at problem length
_WORD_RE = re.compile(r"[a-z0-9]+")
_NUMBER_RE = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d])")
_PLAIN_NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?$")


def bigram_vector(text: str) -> np.ndarray:
    """Counts of the text's word bigrams (and words, for one-word texts) hashed into a fixed
    number of dimensions."""
    words = _WORD_RE.findall(text.lower())
    grams = [f"{a} {b}" for a, b in zip(words, words[1:])] or words
    vector = np.zeros(_DIMENSIONS, dtype=np.float32)
    for gram in grams:
        vector[zlib.crc32(gram.encode()) % _DIMENSIONS] += 1.0
    return vector


def trivial_or_copied(problem: str, reference: str | None) -> bool:
    """A reference of 0 or 1, or a number the problem itself states (thousands commas aside)."""
    if reference is None:
        return False
    answer = reference.replace(",", "").strip().strip("$").strip()
    if not _PLAIN_NUMBER_RE.match(answer):
        return False
    value = float(answer)
    if value in (0.0, 1.0):
        return True
    return any(float(n) == value for n in _NUMBER_RE.findall(problem.replace(",", "")))


@dataclass(frozen=True)
class _Accepted:
    vector: np.ndarray
    words: int
    trivial: bool
    designer_agrees: bool | None


class DriftWindow:
    """The last ``size`` accepted problems of one domain."""

    def __init__(self, size: int = 64):
        if size < 2:
            raise ValueError("a drift window needs at least 2 problems")
        self._items: deque[_Accepted] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, problem: str, reference: str | None, designer_agrees: bool | None = None) -> None:
        self._items.append(
            _Accepted(
                bigram_vector(problem),
                len(problem.split()),
                trivial_or_copied(problem, reference),
                designer_agrees,
            )
        )

    def measures(self) -> dict[str, float]:
        """The measures over the window (empty until it holds 2 problems)."""
        if len(self._items) < 2:
            return {}
        items = list(self._items)
        out = {
            "diversity": mean_pairwise_distance(np.stack([i.vector for i in items])),
            "mean_words": float(np.mean([i.words for i in items])),
            "trivial_answer_share": sum(i.trivial for i in items) / len(items),
        }
        judged = [i.designer_agrees for i in items if i.designer_agrees is not None]
        if judged:
            out["designer_agreement"] = sum(judged) / len(judged)
        return out
