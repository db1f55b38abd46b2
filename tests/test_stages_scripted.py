"""Stages with a scripted backend handed in (``ModelStage(settings, backends=...)``): the exact
model outputs a test needs, so each parsing and judging rule is checked on purpose."""

from __future__ import annotations

import time

import pytest
from scripted_backend import ScriptedBackend

from llm.prompts import PROBLEM_OPEN
from llm.roles import Role
from promptcot.settings import Settings
from streams.records import CandidateProblem, ConceptSet, SeedProblem, Verdict
from streams.topics import CANDIDATES, SEEDS_ANNOTATED, VERDICTS
from workers.stages.annotate import AnnotateStage
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


def test_verify_decides_a_200_kb_candidate_of_math_openers_within_10_s():
    """200 KB of ``\\(`` with a consensus that is not a plain number reaches the validity check
    of the problem's math spans: 75 s holding the GIL with the lazy regex (issue 21). 10 s is a
    behaviour bound for a loaded 2-core machine (measured: under 0.5 s), not a speed goal."""
    from hostile_text import OPENERS

    candidate = CandidateProblem(**_candidate().model_dump(exclude={"id"}) | {"problem": OPENERS})
    solver = ScriptedBackend(_solver(["x+1"] * 3 + list("12345")), version="solver@v3")
    stage = VerifyStage(SETTINGS, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})
    try:
        stage.oracle.equivalent("(2)", "2 + 0")  # the math worker started: not what is timed
        started = time.monotonic()
        [emit] = stage.process([candidate])
        elapsed = time.monotonic() - started
    finally:
        stage.close()
    assert emit.record.reason == "accepted" and emit.record.reference_answer == "x+1"
    assert elapsed < 10.0


def _reloading(respond, version: str, reloaded_to: str) -> ScriptedBackend:
    """A backend that a hot reload moves to other weights while a call is running."""
    backend = ScriptedBackend(lambda p, i: (backend.reload(reloaded_to), respond(p, i))[1], version)
    return backend


def test_verify_names_the_model_version_that_solved_not_one_loaded_since():
    solver = _reloading(_solver(["50", "50", "49", "12"] * 2), "solver@v3", "v4")
    stage = VerifyStage(SETTINGS, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})
    try:
        [emit] = stage.process([_candidate()])
    finally:
        stage.close()
    assert solver.model_version == "scripted@v4"  # the reload happened during the call
    assert emit.record.lineage.models["solver"] == "solver@v3"


def _teacher(prompt: str, _: int) -> str:
    if "foundational concepts a student must know" in prompt:
        return " ratios\n2. percentages\n3. unit prices"
    return "Start from a ratio, then apply a percentage.\n</rationale>"


def _seed(solution: str | None = "3 + 4 = 7.\nSo the answer is 7.") -> SeedProblem:
    return SeedProblem(
        source="gsm8k",
        source_id="1",
        domain="math",
        text="Tom has 3 apples and buys 4 more. How many apples does he have?",
        answer="7",
        solution=solution,
    )


def test_annotate_names_the_teacher_version_that_annotated_not_one_loaded_since():
    settings = Settings(
        metrics={"port": 0}, annotate={"concept_source": "model", "concepts_per_seed": 3}
    )
    teacher = _reloading(_teacher, "teacher@v1", "v2")
    [emit] = AnnotateStage(settings, backends={Role.ANNOTATOR: teacher}).process([_seed()])
    assert emit.topic is SEEDS_ANNOTATED, emit.record
    assert teacher.model_version == "scripted@v2"
    assert emit.record.annotator == "teacher@v1"
    assert emit.record.lineage.models == {"annotator": "teacher@v1"}


def test_annotate_without_a_teacher_touches_no_model():
    """The annotator's model does not even exist: nothing may load it."""
    settings = Settings(
        metrics={"port": 0},
        models={"annotator": {"model": "/nonexistent/teacher"}},
        annotate={"rationale_source": "solution"},
    )
    stage = AnnotateStage(settings)
    stage.ensure_ready()
    assert (stage.chunk_size(8), stage.concurrent(), stage.default_in_flight(8)) == (8, False, 32)
    [rejected] = stage.process([_seed(solution=None)])
    assert rejected.topic is VERDICTS and rejected.record.reason == "no_solution"
    assert rejected.record.lineage.models == {}  # no model judged it


def test_verify_builds_one_oracle_and_one_sandbox_under_concurrent_batches(monkeypatch):
    """Two batches in process at once (a continuous-batching server) share what they start."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    built: list[str] = []
    both_in = threading.Barrier(2)

    def slow(kind: str):
        class Built:
            def __init__(self, _settings) -> None:
                built.append(kind)
                try:  # a second thread racing the first one gets here too
                    both_in.wait(timeout=2)
                except threading.BrokenBarrierError:
                    pass

            def close(self) -> None:
                pass

        return Built

    monkeypatch.setattr("verification.mathcheck.EquivalenceOracle", slow("oracle"))
    monkeypatch.setattr("verification.sandbox.Sandbox", slow("sandbox"))
    for attribute in ("oracle", "sandbox"):
        stage = VerifyStage(SETTINGS)
        both_in.reset()
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(getattr, [stage, stage], [attribute, attribute])
        assert first is second
    assert built == ["oracle", "sandbox"]


def test_concepts_from_the_teacher_with_a_rationale_from_the_solution_is_refused():
    from promptcot.settings import SettingsError

    with pytest.raises(SettingsError, match="concept_source"):
        Settings(annotate={"concept_source": "model", "rationale_source": "solution"})
