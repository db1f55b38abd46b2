"""Intervals and paired comparisons for evaluations: pure functions (the standard library and
numpy, no torch), shared by ``promptcot eval`` (trainer/evaluate.py), bench/loop.py and the
experiment.

- One proportion: Wilson's score interval (``wilson_interval``); the exact Clopper-Pearson one
  (``clopper_pearson``).
- Two models on the same items, accuracy (``paired_accuracy``): McNemar's exact test, i.e. the
  two-sided binomial test of the discordant pairs at 1/2, and an interval for the difference of
  accuracies that agrees with it: given the m discordant items, the Clopper-Pearson interval of
  the share won by A, mapped onto (wins of A - wins of B) / n. It excludes 0 exactly when the
  test's p-value is below 1 - confidence, so the verdict and the interval never disagree.
- Two models on the same items, a ratio such as the NLL per token (``paired_ratio``): the
  paired percentile bootstrap (items resampled, both models' sums taken on the same resample),
  each side a ratio of sums (tokens weight every item, as in the single run's figure).

A verdict reads "A better", "B better" or "no evidence of a difference": an interval that touches
0 (a tie included) is never read as "not worse".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from statistics import NormalDist
from typing import Any

import numpy as np

NO_EVIDENCE = "no evidence of a difference"
BOOTSTRAP_RESAMPLES = 10_000
_CHUNK = 1_000  # resamples drawn at once: bounds memory on the full GSM8K test split


def normal_quantile(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level (0.95 -> 1.95996...)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _check_count(successes: int, n: int) -> None:
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (no items: the whole of [0, 1])."""
    _check_count(successes, n)
    if n == 0:
        return 0.0, 1.0
    z = normal_quantile(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n in the thousands is fine)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * log_p
        + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _solve_decreasing(f: Any, target: float) -> float:
    """The p in (0, 1) where a decreasing ``f`` crosses ``target`` (bisection to 1e-12)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if f(mid) > target:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion: each end holds (1-confidence)/2 of
    the binomial tail."""
    _check_count(successes, n)
    if n == 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2.0
    # Lower end: P(X >= k; p) = tail, i.e. P(X <= k-1; p) = 1 - tail (decreasing in p).
    low = (
        0.0
        if successes == 0
        else _solve_decreasing(lambda p: _binomial_cdf(successes - 1, n, p), 1.0 - tail)
    )
    high = (
        1.0 if successes == n else _solve_decreasing(lambda p: _binomial_cdf(successes, n, p), tail)
    )
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact (conditional) two-sided p-value: the b + c discordant pairs under
    Binomial(b + c, 1/2), twice the smaller tail, at most 1. No discordant pair: 1."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**m)))


def verdict(low: float, high: float, *, higher_is_better: bool, names=("A", "B")) -> str:
    """Which of two models an interval of (A - B) favours; one touching 0 favours neither."""
    a, b = names
    if low > 0:
        return f"{a if higher_is_better else b} better"
    if high < 0:
        return f"{b if higher_is_better else a} better"
    return NO_EVIDENCE


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two models on the same n items: the figure of each, their
    difference (A - B) with its interval, the method, and the verdict."""

    measure: str
    n: int
    a: float
    b: float
    difference: float
    low: float
    high: float
    method: str
    verdict: str
    p_value: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def paired_accuracy(
    a: Sequence[bool], b: Sequence[bool], confidence: float = 0.95, names=("A", "B")
) -> Paired:
    """Accuracy of A vs B on the same items (``a[i]``, ``b[i]``: item i solved): McNemar's
    exact test and the matching conditional interval of the difference (module docstring)."""
    if len(a) != len(b):
        raise ValueError(f"paired results differ in length: {len(a)} and {len(b)}")
    n = len(a)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    m = a_only + b_only
    if m:
        low_share, high_share = clopper_pearson(a_only, m, confidence)
        low, high = (m / n) * (2 * low_share - 1), (m / n) * (2 * high_share - 1)
    else:
        low = high = 0.0
    return Paired(
        measure="accuracy",
        n=n,
        a=sum(map(bool, a)) / n if n else 0.0,
        b=sum(map(bool, b)) / n if n else 0.0,
        difference=(a_only - b_only) / n if n else 0.0,
        low=low,
        high=high,
        method=f"McNemar exact test; {confidence:.0%} interval: Clopper-Pearson of the "
        "discordant pairs, conditional on their number",
        verdict=verdict(low, high, higher_is_better=True, names=names),
        p_value=mcnemar_exact(a_only, b_only),
        detail={
            f"{names[0]} right, {names[1]} wrong": a_only,
            f"{names[1]} right, {names[0]} wrong": b_only,
        },
    )


def _resampled_sums(columns: Sequence[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """Each column's sum over ``resamples`` bootstrap resamples of its rows (the same resample
    for every column: the pairing)."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    sums: list[list[np.ndarray]] = [[] for _ in columns]
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)
        for out, column in zip(sums, columns):
            out.append(counts @ column)
    return [np.concatenate(s) for s in sums]


def ratio_interval(
    numerators: Sequence[float],
    denominators: Sequence[float],
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of sum(numerators) / sum(denominators) over items (e.g.
    NLL per token: summed NLL and tokens per item)."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    if len(num) != len(den) or not len(num) or den.sum() <= 0:
        raise ValueError("need items with a positive total denominator")
    s_num, s_den = _resampled_sums([num, den], resamples, seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(s_num / s_den, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_ratio(
    a: tuple[Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float]],
    *,
    measure: str,
    higher_is_better: bool,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    names=("A", "B"),
) -> Paired:
    """A ratio of sums (``a`` = (numerators, denominators) per item, ``b`` likewise on the same
    items in the same order) of A vs B: the difference A - B and its paired percentile-bootstrap
    interval (items resampled, each side's ratio of sums on the same resample)."""
    columns = [np.asarray(x, float) for x in (*a, *b)]
    n = len(columns[0])
    if any(len(c) != n for c in columns) or not n:
        raise ValueError("paired results need the same, non-zero number of items")
    if columns[1].sum() <= 0 or columns[3].sum() <= 0:
        raise ValueError("paired ratios need a positive total denominator on both sides")
    ratio_a, ratio_b = columns[0].sum() / columns[1].sum(), columns[2].sum() / columns[3].sum()
    num_a, den_a, num_b, den_b = _resampled_sums(columns, resamples, seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(num_a / den_a - num_b / den_b, [tail, 1.0 - tail])
    low, high = float(low), float(high)
    return Paired(
        measure=measure,
        n=n,
        a=float(ratio_a),
        b=float(ratio_b),
        difference=float(ratio_a - ratio_b),
        low=low,
        high=high,
        method=f"paired percentile bootstrap, {resamples} resamples of the items (seed {seed}), "
        f"{confidence:.0%}; each side a ratio of sums over the items",
        verdict=verdict(low, high, higher_is_better=higher_is_better, names=names),
    )
