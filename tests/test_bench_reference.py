"""bench/reference.py: the rule it reproduces for "before", its interval, and its replay."""

from __future__ import annotations

import pytest

from bench.reference import ReplayBackend, before_rule, wilson
from llm.backends.base import Completion
from streams.records import CandidateProblem
from verification.mathcheck import EquivalenceOracle


def test_wilson_interval_matches_known_values():
    low, high = wilson(5, 10)
    assert (round(low, 3), round(high, 3)) == (0.237, 0.763)
    assert wilson(0, 20)[0] == 0.0 and 0.16 < wilson(0, 20)[1] < 0.17
    assert wilson(0, 0) == (0.0, 1.0)


def _done(text: str, cut: bool = False) -> Completion:
    return Completion(text, 10, len(text.split()), "length" if cut else "stop")


def test_the_before_rule_is_the_plurality_with_truncated_rollouts_voting():
    candidate = CandidateProblem(
        concept_set_id="c", domain="math", difficulty="", concepts=[], rationale="", problem="p?"
    )
    rollouts = [_done("\\boxed{7}"), _done("\\boxed{8}")] + [_done("adding 50 50", cut=True)] * 3
    rollouts += [_done("\\boxed{9}")] * 3
    with EquivalenceOracle() as oracle:
        # 3 truncated "50"s tie the three 9s: the old rule counted the cut rollouts' last number.
        assert before_rule(candidate, rollouts, oracle) == (False, "tied_majority", None)
        rollouts[0] = _done("so it is 50")  # the last-number fallback votes too: 4 of 8 say 50
        assert before_rule(candidate, rollouts, oracle) == (True, "accepted", "50")


def test_the_replay_answers_with_the_recorded_rollouts_of_the_problem_in_the_prompt():
    from llm.backends.base import BackendSettings

    class Render:
        settings = BackendSettings(model="x")
        model_version = "solver@v0"

        def render_messages(self, messages):
            return "|".join(m["content"] for m in messages)

    recorded = {"What is 2+2?": [_done("\\boxed{4}")], "What is 2+2? Then add 1.": [_done("5")]}
    replay = ReplayBackend(recorded, Render())
    [[a], [b]] = replay.generate(["Solve: What is 2+2? Then add 1.", "Solve: What is 2+2?"], n=1)
    assert (a.text, b.text) == ("5", "\\boxed{4}")
    with pytest.raises(NotImplementedError):
        replay.score([], [])


def test_designer_stats_count_the_answers_a_rationale_states_and_checks():
    from bench.reference import designer_stats

    def cand(rationale: str) -> CandidateProblem:
        return CandidateProblem(
            concept_set_id="c",
            domain="math",
            difficulty="",
            concepts=[],
            rationale=rationale,
            problem="p?",
        )

    stats = designer_stats(
        [
            cand("48/2 = 24 clips, so the answer is 24."),
            cand("So the answer is 1000."),  # a bare claim: nothing checked
            cand("48/2 = 25, so the answer is 25."),
            cand("Concepts to combine: fractions."),
        ]
    )
    assert (stats["states_a_checked_answer"], stats["rate"]) == (1, 0.25)
    assert stats["reasons"] == {"no_reference": 2, "designer_arithmetic": 1}
