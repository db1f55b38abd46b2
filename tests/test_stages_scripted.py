"""Stages with a scripted backend handed in (``ModelStage(settings, backends=...)``): the exact
model outputs a test needs, so each parsing and judging rule is checked on purpose."""

from __future__ import annotations

import pytest
from scripted_backend import ScriptedBackend

from promptcot.settings import Settings
from streams.records import CandidateProblem, ConceptSet, Verdict
from streams.topics import CANDIDATES, VERDICTS
from workers.prompts import PROBLEM_OPEN
from workers.roles import Role
from workers.stages.generate import GenerateStage
from workers.stages.verify import VerifyStage

SETTINGS = Settings(metrics={"port": 0}, generation={"max_problem_tokens": 40})


def _set(i: int) -> ConceptSet:
    return ConceptSet(
        domain="math", concepts=["ratios", "percent"], difficulty="AMC12", draw=f"scripted:{i}"
    )


def _writer(problem: str, rationale: str = "Combine a ratio with a percent change."):
    def respond(prompt: str, _: int) -> str:
        if prompt.rstrip().endswith(PROBLEM_OPEN):  # the problem phase, after the bridge
            return problem
        return f"{rationale}\n</rationale>\n<problem>\nignored"

    return respond


def test_generate_turns_a_well_formed_output_into_a_candidate_with_its_model_version():
    problem = "A shop raises a $40 price by 25%. What is the new price?\n</problem>"
    backend = ScriptedBackend(_writer(problem), version="p-theta@v7")
    [emit] = GenerateStage(SETTINGS, backends={Role.PROMPT_MODEL: backend}).process([_set(0)])
    assert emit.topic is CANDIDATES
    candidate = emit.record
    assert isinstance(candidate, CandidateProblem)
    assert candidate.problem == "A shop raises a $40 price by 25%. What is the new price?"
    assert candidate.rationale == "Combine a ratio with a percent change."
    assert candidate.generator == "p-theta@v7"
    assert candidate.lineage.models == {"prompt_model": "p-theta@v7"}
    assert candidate.parent_ids == [_set(0).id]


@pytest.mark.parametrize(
    "problem,reason",
    [
        (" ".join(["word"] * 60), "truncated"),  # cut by max_problem_tokens, never closed
        ("", "empty_completion"),
        ("Is 3 <rationale> 4? </problem>", "malformed_problem"),
    ],
)
def test_generate_rejects_malformed_output_with_the_parser_reason(problem, reason):
    backend = ScriptedBackend(_writer(problem), version="p-theta@v7")
    [emit] = GenerateStage(SETTINGS, backends={Role.PROMPT_MODEL: backend}).process([_set(1)])
    assert emit.topic is VERDICTS
    verdict = emit.record
    assert isinstance(verdict, Verdict) and not verdict.accepted
    assert verdict.reason == reason and verdict.stage == "generate"
    assert verdict.lineage.models == {"prompt_model": "p-theta@v7"}


def _solver(answers: list[str]):
    return lambda prompt, i: f"We compute step by step.\n\\boxed{{{answers[i]}}}"


def _candidate() -> CandidateProblem:
    return CandidateProblem(
        concept_set_id="cset_x",
        domain="math",
        difficulty="AMC12",
        concepts=["ratios"],
        rationale="r",
        problem="A price of $40 rises by 25%. What is the new price?",
    )


@pytest.mark.parametrize(
    "answers,accepted,reason,pass_rate",
    [
        (["50", "50", "50", "49", "12", "7", "3", "1"], True, "accepted", 3 / 8),
        (["50"] * 8, False, "too_easy", 1.0),
        (["1", "2", "3", "4", "5", "6", "7", "8"], False, "no_consensus", 0.0),
    ],
)
def test_verify_votes_and_applies_the_difficulty_band(answers, accepted, reason, pass_rate):
    solver = ScriptedBackend(_solver(answers), version="solver@v3")
    stage = VerifyStage(SETTINGS, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})
    try:
        [emit] = stage.process([_candidate()])
    finally:
        stage.close()
    verdict = emit.record
    assert (verdict.accepted, verdict.reason) == (accepted, reason)
    assert verdict.pass_rate == pytest.approx(pass_rate)
    if accepted:
        assert verdict.reference_answer == "50"
        assert [r.passed for r in verdict.rollouts] == [a == "50" for a in answers]
    assert verdict.lineage.models["solver"] == "solver@v3"
