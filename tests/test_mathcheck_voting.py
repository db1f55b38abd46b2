"""Majority voting by equivalence (verification/mathcheck/voting.py)."""

from __future__ import annotations

import time

import pytest

from verification.mathcheck import EquivalenceOracle, MathCheckSettings, vote


@pytest.fixture(scope="module")
def oracle():
    with EquivalenceOracle(MathCheckSettings()) as o:
        yield o


def test_vote_clear_majority_by_equivalence(oracle):
    result = vote(["18", "18.0", "\\frac{36}{2}", None, "19", "$18$", "x", "18 + 0"], oracle, 0.25)
    assert result.reference == "18"
    assert result.share == 5 / 8
    assert result.agree == [True, True, True, False, False, True, False, True]
    assert result.n_clusters == 3 and result.n_missing == 1 and result.reason is None
    assert result.pass_rate == 5 / 8


def test_vote_tie_gives_no_reference(oracle):
    result = vote(["3", "3.0", "5", "\\frac{10}{2}", None, None], oracle, 0.25)
    assert result.reference is None and result.reason == "tied_majority"
    assert result.share == 2 / 6 and result.agree == [False] * 6 and result.n_clusters == 2


def test_vote_all_missing(oracle):
    result = vote([None, None, "  ", None], oracle, 0.25)
    assert result.reason == "no_answer" and result.reference is None
    assert result.n_missing == 4 and result.share == 0.0 and result.n_clusters == 0
    assert vote([], oracle, 0.25).reason == "no_answer"


def test_vote_below_threshold_counts_missing_rollouts(oracle):
    # 2 of 8 agree: a 2/2 majority among answered rollouts, but only 0.25 of all rollouts.
    answers = ["7", "7.0", None, None, None, None, None, None]
    assert vote(answers, oracle, 0.3).reason == "no_consensus"
    ok = vote(answers, oracle, 0.25)
    assert ok.reference == "7" and ok.share == 0.25 and ok.agree == [True, True] + [False] * 6


def test_vote_all_distinct_is_no_consensus(oracle):
    result = vote([str(n) for n in range(8)], oracle, 0.25)
    assert result.reason == "no_consensus" and result.n_clusters == 8 and result.share == 1 / 8


TOWERS = [f"(10^{{10^{{{k}}}}})!" for k in range(3, 11)]  # eight distinct; each hangs sympy


def test_a_vote_of_hostile_towers_is_decided_within_its_budget_without_repeated_restarts():
    """Eight distinct power towers (28 pairs, each hanging sympy) cost one vote 54 s and 23
    restarts of the math worker (issue 21). Now a vote waits for the worker at most
    ``vote_budget_s`` (4 s) in all, and a check that overran stops the call's checks sharing an
    answer with it: at most two overruns, at most one restart within the vote. The 30 s bound
    is the budget plus worker starts on a loaded 2-core machine, not a speed goal."""
    with EquivalenceOracle(MathCheckSettings()) as o:
        assert o.equivalent("(2)", "2 + 0")  # worker up and warm
        starts = o.worker_starts
        started = time.monotonic()
        result = vote(TOWERS, o, 0.25)
        elapsed = time.monotonic() - started
    assert result.reason == "no_consensus" and result.n_clusters == 8
    assert o.timeouts <= 2 and o.worker_starts - starts <= 1
    assert elapsed < 30.0


def test_a_hostile_answer_among_good_ones_leaves_the_majority_standing(oracle):
    answers = ["\\frac{1}{2}", "0.5", "\\frac{1}{2}", TOWERS[0], "1/2", TOWERS[1], "3", None]
    result = vote(answers, oracle, 0.25)
    assert result.reference == "\\frac{1}{2}" and result.share == 4 / 8
    assert result.agree == [True, True, True, False, True, False, False, False]
