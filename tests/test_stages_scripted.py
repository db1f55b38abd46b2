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


# The designer's rationale states 50, and its one arithmetic step checks.
DESIGNER_RATIONALE = "A $40 price rises by 25%: 40 * 25% = 10 more, so the answer is 50."


def _candidate(rationale: str = DESIGNER_RATIONALE) -> CandidateProblem:
    return CandidateProblem(
        concept_set_id="cset_x",
        domain="math",
        difficulty="AMC12",
        concepts=["ratios"],
        rationale=rationale,
        problem="A price of $40 rises by 25%. What is the new price?",
    )


def _verify(candidate: CandidateProblem, solver: ScriptedBackend, settings=SETTINGS, **backends):
    stage = VerifyStage(
        settings, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver, **backends}
    )
    try:
        [emit] = stage.process([candidate])
    finally:
        stage.close()
    assert emit.topic is VERDICTS
    return emit.record


# 3 of 8 say 49 (the plurality), 2 say 50 (the designer's answer).
SPLIT = ["49", "50", "49", "12", "50", "7", "49", "3"]


def test_a_rollout_that_agrees_with_the_designer_passes_the_plurality_alone_does_not():
    verdict = _verify(_candidate(), ScriptedBackend(_solver(SPLIT), version="solver@v3"))
    assert (verdict.accepted, verdict.reason) == (True, "accepted")
    assert verdict.reference_answer == "50" and verdict.reference_source == "designer"
    assert [r.passed for r in verdict.rollouts] == [a == "50" for a in SPLIT]
    assert verdict.pass_rate == pytest.approx(2 / 8)
    assert {r.failure for r in verdict.rollouts if not r.passed} == {"disagrees"}
    assert "plurality '49'" in verdict.detail  # the solver's own choice is on record, not used
    assert verdict.lineage.models["solver"] == "solver@v3"

    # The same rollouts for a designer that states no answer: the plurality is no reference.
    solver = ScriptedBackend(_solver(SPLIT))
    unanswered = _verify(_candidate("Combine a price with a percent change."), solver)
    assert (unanswered.accepted, unanswered.reason) == (False, "no_reference")
    assert unanswered.reference_answer is None and unanswered.rollouts == []
    assert solver.prompts == []  # no reference, no rollouts spent


def test_truncated_rollouts_and_rollouts_without_a_final_answer_do_not_vote():
    """Cut by max_tokens on a run of 50s, or ending "... is 50." with no final answer: the
    last-number fallback would read 50 from each and count them as agreeing."""
    settings = Settings(metrics={"port": 0}, verify={"max_tokens": 20})
    texts = [
        "So the answer is 50.",  # an explicit final answer
        "\\boxed{50}",
        "We keep adding 50 " * 10,  # cut at 20 words
        "We keep adding 50 " * 10,
        "We keep adding 50 " * 10,
        "The new price comes to 50.",  # no final answer
        "\\boxed{7}",
        "\\boxed{12}",
    ]
    verdict = _verify(_candidate(), ScriptedBackend(lambda p, i: texts[i]), settings)
    assert (verdict.accepted, verdict.pass_rate) == (True, pytest.approx(2 / 8))
    failures = [r.failure for r in verdict.rollouts]
    assert (
        failures
        == [None, None, "truncated", "truncated", "truncated", "no_answer"] + ["disagrees"] * 2
    )
    assert [r.answer for r in verdict.rollouts[2:6]] == [None] * 4

    # The same under the opt-in self-agreement rule: the truncated 50s cannot make a plurality.
    majority = Settings(
        metrics={"port": 0}, verify={"max_tokens": 20, "math": {"reference": "majority"}}
    )
    texts[0], texts[1] = "\\boxed{7}", "\\boxed{12}"
    verdict = _verify(_candidate(), ScriptedBackend(lambda p, i: texts[i]), majority)
    assert verdict.reference_source == "majority"
    assert (verdict.accepted, verdict.reason) == (False, "tied_majority")  # 7 and 12, twice each


def test_arithmetic_that_does_not_check_leaves_no_reference():
    solver = ScriptedBackend(_solver(["50"] * 8))
    verdict = _verify(_candidate("The price rises by 40 * 25% = 12, so the answer is 52."), solver)
    assert (verdict.accepted, verdict.reason) == (False, "designer_arithmetic")
    assert "40 * 25% = 12" in verdict.detail
    assert verdict.reference_answer is None and solver.prompts == []


@pytest.mark.parametrize(
    "answers,accepted,reason,pass_rate",
    [
        (["50", "50", "50", "49", "12", "7", "3", "1"], True, "accepted", 3 / 8),
        (["50"] * 8, False, "too_easy", 1.0),
        (["1", "2", "3", "4", "5", "6", "7", "8"], False, "no_consensus", 0.0),
    ],
)
def test_majority_is_an_opt_in_plurality_of_the_solver(answers, accepted, reason, pass_rate):
    settings = Settings(metrics={"port": 0}, verify={"math": {"reference": "majority"}})
    verdict = _verify(_candidate("no stated answer"), ScriptedBackend(_solver(answers)), settings)
    assert (verdict.accepted, verdict.reason) == (accepted, reason)
    assert verdict.pass_rate == pytest.approx(pass_rate)
    assert verdict.reference_source == "majority"
    if accepted:
        assert verdict.reference_answer == "50"
        assert [r.passed for r in verdict.rollouts] == [a == "50" for a in answers]


def test_with_a_teacher_configured_its_majority_is_the_reference():
    """The designer says 50; three of the teacher's four rollouts say 49 (one is cut off)."""
    configured = Settings(metrics={"port": 0}, models={"teacher": {"model": "strong-teacher"}})
    teacher_texts = ["\\boxed{49}", "the answer is 49", "\\boxed{49}", "49 " * 2000]
    teacher = ScriptedBackend(lambda p, i: teacher_texts[i], version="teacher@v1")
    verdict = _verify(
        _candidate(), ScriptedBackend(_solver(SPLIT)), configured, **{Role.TEACHER: teacher}
    )
    assert (verdict.accepted, verdict.reference_answer) == (True, "49")
    assert verdict.reference_source == "teacher" and verdict.pass_rate == pytest.approx(3 / 8)
    assert [r.passed for r in verdict.teacher_rollouts] == [True, True, True, False]
    assert verdict.teacher_rollouts[3].failure == "truncated"
    assert verdict.lineage.models["teacher"] == "teacher@v1"

    split = ScriptedBackend(lambda p, i: f"\\boxed{{{i % 2}}}")  # 2 vs 2: no majority
    solver = ScriptedBackend(_solver(SPLIT))
    verdict = _verify(_candidate(), solver, configured, **{Role.TEACHER: split})
    assert (verdict.accepted, verdict.reason) == (False, "no_reference")
    assert solver.prompts == [] and len(verdict.teacher_rollouts) == 4


def test_the_embedded_default_has_no_teacher_and_asking_for_one_is_refused():
    assert VerifyStage(SETTINGS).reference_source == "designer"
    with pytest.raises(ValueError, match="models.teacher.model"):
        VerifyStage(Settings(metrics={"port": 0}, verify={"math": {"reference": "teacher"}}))


def test_verify_decides_a_200_kb_candidate_of_math_openers_within_10_s():
    """200 KB of ``\\(`` with a consensus that is not a plain number reaches the validity check
    of the problem's math spans: 75 s holding the GIL with the lazy regex (issue 21). 10 s is a
    behaviour bound for a loaded 2-core machine (measured: under 0.5 s), not a speed goal."""
    from hostile_text import OPENERS

    candidate = CandidateProblem(**_candidate().model_dump(exclude={"id"}) | {"problem": OPENERS})
    solver = ScriptedBackend(_solver(["x+1"] * 3 + list("12345")), version="solver@v3")
    # The opt-in plurality: the reference is the rollouts' "x+1", whatever the designer says.
    majority = Settings(metrics={"port": 0}, verify={"math": {"reference": "majority"}})
    stage = VerifyStage(majority, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})
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
    solver = _reloading(_solver(["50", "49", "49", "12"] * 2), "solver@v3", "v4")
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
