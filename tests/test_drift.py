"""Drift of the accepted problems (workers/drift.py) and the gauges verify sets from it."""

from __future__ import annotations

import pytest
from scripted_backend import ScriptedBackend

from llm.roles import Role
from promptcot.settings import Settings
from streams import metrics
from streams.records import CandidateProblem
from workers.drift import DriftWindow, trivial_or_copied
from workers.stages.verify import VerifyStage

APPLES = "Tom has 12 apples and buys 30 more. How many apples does he have now?"
TRAIN = "A train leaves at 3 pm and travels 240 miles at 60 miles per hour. When does it arrive?"


def test_repeating_one_problem_has_no_diversity_and_distinct_ones_have_some():
    same, mixed = DriftWindow(8), DriftWindow(8)
    for _ in range(4):
        same.add(APPLES, "42")
    for text in (APPLES, TRAIN):
        mixed.add(text, "42")
    assert same.measures()["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert mixed.measures()["diversity"] > 0.5
    assert mixed.measures()["mean_words"] == pytest.approx((15 + 19) / 2)
    assert DriftWindow(8).measures() == {}  # nothing to compare yet


def test_the_window_keeps_the_last_problems_only():
    window = DriftWindow(2)
    window.add(APPLES, "42")
    for _ in range(2):
        window.add(TRAIN, "7 pm")
    assert len(window) == 2 and window.measures()["diversity"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "reference,trivial",
    [("42", False), ("1", True), ("0", True), ("12", True), ("30.0", True), ("$1,200", False)],
)
def test_a_trivial_or_copied_answer(reference, trivial):
    """0 and 1, or a number the problem itself states, give the answer away."""
    assert trivial_or_copied(APPLES, reference) is trivial


def test_trivial_share_and_designer_agreement_over_the_window():
    window = DriftWindow(8)
    window.add(APPLES, "42", designer_agrees=True)
    window.add(TRAIN, "12", designer_agrees=False)
    window.add(APPLES, "1", designer_agrees=None)  # no designer answer: not counted
    m = window.measures()
    assert m["trivial_answer_share"] == pytest.approx(1 / 3)
    assert m["designer_agreement"] == pytest.approx(1 / 2)


def _gauge(gauge, **labels) -> float:
    return gauge.labels(**labels)._value.get()


def test_verify_sets_the_drift_gauges_from_its_accepted_problems():
    """Two accepted problems: the solver plurality agrees with the designer on one of them."""
    settings = Settings(metrics={"port": 0}, verify={"drift_window": 8})
    answers = {  # problem -> the eight rollouts' answers
        APPLES: ["42", "42", "41", "41", "41", "40", "39", "38"],  # plurality 41, designer 42
        TRAIN: ["7", "7", "7", "6", "5", "4", "3", "2"],  # plurality 7 = designer 7
    }

    def solve(prompt: str, i: int) -> str:
        problem = APPLES if APPLES in prompt else TRAIN
        return f"\\boxed{{{answers[problem][i]}}}"

    solver = ScriptedBackend(solve)
    stage = VerifyStage(settings, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})
    candidates = [
        CandidateProblem(
            concept_set_id=f"cset_{i}",
            domain="math",
            difficulty="grade school",
            concepts=["addition"],
            rationale=rationale,
            problem=problem,
        )
        for i, (problem, rationale) in enumerate(
            [
                (APPLES, "12 + 30 = 42, so the answer is 42."),
                (TRAIN, "240 / 60 = 4 hours after 3 pm: 3 + 4 = 7, so the answer is 7."),
            ]
        )
    ]
    try:
        emits = stage.process(candidates)
    finally:
        stage.close()
    assert [e.record.accepted for e in emits] == [True, True]
    assert _gauge(metrics.DESIGNER_AGREEMENT, domain="math") == pytest.approx(0.5)
    assert _gauge(metrics.ACCEPTED_DIVERSITY, domain="math") > 0.5
    assert _gauge(metrics.ACCEPTED_MEAN_WORDS, domain="math") == pytest.approx(17.0)
    assert _gauge(metrics.ACCEPTED_TRIVIAL_ANSWERS, domain="math") == pytest.approx(0.0)
