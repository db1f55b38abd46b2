"""trainer/stats.py against published numbers: Wilson and Clopper-Pearson intervals from
Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
methods", Stat Med 17:857-872, Table II (methods 3 and 5); McNemar's exact conditional p-value
from Fagerland, Lydersen & Laake (2013), "The McNemar test for binary matched-pairs data",
BMC Med Res Methodol 13:91 (the airway hyper-responsiveness example: b = 1, c = 7), and the
binomial arithmetic a reader can redo by hand."""

from __future__ import annotations

import pytest

from trainer import stats

# (successes, n) -> (Wilson low, high), (Clopper-Pearson low, high), 4 decimals as published.
NEWCOMBE = {
    (81, 263): ((0.2553, 0.3662), (0.2527, 0.3676)),
    (15, 148): ((0.0624, 0.1605), (0.0578, 0.1617)),
    (0, 20): ((0.0, 0.1611), (0.0, 0.1684)),
    (1, 29): ((0.0061, 0.1718), (0.0009, 0.1776)),
}


@pytest.mark.parametrize(("k", "n"), sorted(NEWCOMBE))
def test_wilson_and_clopper_pearson_match_newcombe_1998(k, n):
    wilson, exact = NEWCOMBE[(k, n)]
    assert stats.wilson_interval(k, n) == pytest.approx(wilson, abs=5e-5)
    assert stats.clopper_pearson(k, n) == pytest.approx(exact, abs=5e-5)


def test_interval_edges_and_bad_counts():
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = stats.wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.1611, abs=5e-5)  # the mirror of 0/20
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson_interval(3, 2)


def test_mcnemar_exact_matches_the_published_example_and_hand_arithmetic():
    assert stats.mcnemar_exact(1, 7) == pytest.approx(0.0703, abs=5e-5)  # Fagerland et al.
    assert stats.mcnemar_exact(7, 1) == stats.mcnemar_exact(1, 7)
    assert stats.mcnemar_exact(0, 6) == 2 / 2**6  # both tails of the all-one-way outcome
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(4, 4) == 1.0


def test_a_tie_at_zero_is_no_evidence_never_not_worse():
    same = [True, False, False, True, False]
    tie = stats.paired_accuracy(same, same)
    assert (tie.difference, tie.low, tie.high, tie.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert tie.verdict == stats.NO_EVIDENCE == "no evidence of a difference"
    none_right = stats.paired_accuracy([False] * 20, [False] * 20)  # 0/20 vs 0/20
    assert none_right.verdict == "no evidence of a difference"
    balanced = stats.paired_accuracy([True, False] * 5, [False, True] * 5)
    assert balanced.low < 0 < balanced.high and balanced.verdict == stats.NO_EVIDENCE
    nll = stats.paired_ratio(
        ([2.0, 3.0, 4.0], [1, 2, 3]),
        ([2.0, 3.0, 4.0], [1, 2, 3]),
        measure="nll",
        higher_is_better=False,
    )
    assert (nll.low, nll.high, nll.verdict) == (0.0, 0.0, stats.NO_EVIDENCE)


def test_the_accuracy_verdict_and_interval_agree_with_mcnemar():
    """8 discordant pairs all one way: p = 2/256 < 0.05, A better; 7 vs 1: p = 0.0703, no
    evidence, and the interval of A - B then touches 0."""
    a = [True] * 8 + [False] * 12
    b = [False] * 8 + [False] * 12
    won = stats.paired_accuracy(a, b)
    assert won.p_value == pytest.approx(2 / 256) and won.low > 0 and won.verdict == "A better"
    assert won.difference == pytest.approx(8 / 20)
    assert stats.paired_accuracy(b, a, names=("base", "last")).verdict == "last better"
    a = [True] * 7 + [False] + [True] * 4 + [False] * 8
    b = [False] * 7 + [True] + [True] * 4 + [False] * 8
    close = stats.paired_accuracy(a, b)
    assert close.p_value == pytest.approx(0.0703, abs=5e-5)
    assert close.low < 0 < close.high and close.verdict == stats.NO_EVIDENCE
    assert close.detail == {"A right, B wrong": 7, "B right, A wrong": 1}


def test_paired_nll_finds_the_better_model_and_weights_by_tokens():
    tokens = [10, 20, 30, 40, 50, 60, 70, 80]
    good = [1.0 * t for t in tokens]
    bad = [1.2 * t for t in tokens]
    lower = stats.paired_ratio((good, tokens), (bad, tokens), measure="nll", higher_is_better=False)
    assert lower.difference == pytest.approx(-0.2) and lower.high < 0
    assert lower.verdict == "A better"
    # Token weighting: one long item at 2.0/token and one short at 1.0/token is 1.9, not 1.5.
    assert stats.paired_ratio(
        ([200.0, 10.0], [100, 10]), ([0.0, 0.0], [100, 10]), measure="nll", higher_is_better=False
    ).a == pytest.approx(210 / 110)
    low, high = stats.ratio_interval(good, tokens)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
