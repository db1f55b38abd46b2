"""Each stage's pure `process`, without Kafka, on the tiny real model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm.prompts import SYNTHESIS, synthesis_fields, synthesis_parts
from llm.roles import Role
from promptcot.settings import Settings
from streams.records import (
    AnnotatedSeed,
    CandidateProblem,
    ConceptSet,
    Rationale,
    Rollout,
    SeedProblem,
    Verdict,
)
from streams.topics import CANDIDATES, CONCEPTS, RATIONALES, SEEDS_ANNOTATED, VERDICTS
from workers.stages.annotate import AnnotateStage
from workers.stages.generate import GenerateStage
from workers.stages.pairs import PairsStage, build_pairs
from workers.stages.rationale import RationaleStage
from workers.stages.sampler import SamplerStage
from workers.stages.verify import TOO_EASY, TOO_HARD, VerifyStage, difficulty_issue


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> Settings:
    model = {"kind": "transformers", "model": str(tiny_model_dir)}
    roles = ("prompt_model", "rationale_model", "solver", "test_writer", "annotator")
    return Settings(
        models=dict.fromkeys(roles, model),
        metrics={"port": 0},
        sink={"output_dir": str(tmp_path_factory.mktemp("out"))},
        generation={"max_rationale_tokens": 64, "max_problem_tokens": 64},
        verify={"rollouts": 4, "max_tokens": 80},
        rationale={"samples": 3, "max_tokens": 96},
        annotate={"max_tokens": 40},
    )


def _sets(n: int, domain: str = "math") -> list[ConceptSet]:
    return [
        ConceptSet(
            domain=domain,
            concepts=["ratios", "percentages", "averages"],
            difficulty="AMC12",
            draw=f"test:{i}",
        )
        for i in range(n)
    ]


# --- sampler ----------------------------------------------------------------------------------


def test_sampler_keeps_a_bounded_window_in_flight():
    s = Settings(sampler={"max_in_flight": 3, "max_issued": 5}, metrics={"port": 0})
    stage = SamplerStage(s)
    stage.ensure_ready()
    first = stage.start()
    assert len(first) == 3 and all(e.topic is CONCEPTS for e in first)
    issued = [e.record for e in first]
    assert len({c.id for c in issued}) == 3
    stranger = Verdict(
        subject_id="x", stage="verify", accepted=True, reason="accepted", domain="math"
    )
    assert stage.process([stranger]) == []  # not one of ours: nothing opens
    closing = [
        Verdict(
            subject_id=c.id,
            stage="generate",
            accepted=False,
            reason="missing_problem",
            domain="math",
            lineage=c.lineage,
        )
        for c in issued[:2]
    ]
    more = stage.process(closing)
    assert len(more) == 2  # one new set per closed set
    again = stage.process(
        [
            Verdict(
                subject_id=m.record.id,
                stage="verify",
                accepted=False,
                reason="too_easy",
                domain="math",
                lineage=m.record.lineage,
            )
            for m in more
        ]
    )
    assert len(again) == 0 and stage.issued == 5  # max_issued caps the total


# --- generate ---------------------------------------------------------------------------------


def test_generate_settles_every_concept_set_with_lineage(settings):
    stage = GenerateStage(settings)
    sets = _sets(4)
    emits = stage.process(sets)
    settled = {}
    for e in emits:
        r = e.record
        key = r.concept_set_id if e.topic is CANDIDATES else r.subject_id
        settled[key] = r
        if e.topic is CANDIDATES:
            assert isinstance(r, CandidateProblem) and r.problem and r.rationale
            assert (
                r.lineage.models["prompt_model"] == stage.backend(Role.PROMPT_MODEL).model_version
            )
            assert r.lineage.templates == {"synthesis": SYNTHESIS.hash}
        else:
            assert e.topic is VERDICTS and not r.accepted and r.reason
    assert set(settled) == {s.id for s in sets}
    assert any(e.topic is CANDIDATES for e in emits), "the tiny model learned the format"
    # A redelivered batch yields the same ids: downstream keeps the first of each.
    assert {e.record.id for e in stage.process(sets)} == {e.record.id for e in emits}


def test_generate_rejects_a_prompt_over_the_context_without_raising(settings):
    small = settings.model_copy(deep=True)
    small.models.prompt_model.max_model_len = 24
    emits = GenerateStage(small).process(_sets(2))
    assert [e.record.reason for e in emits] == ["context_overflow", "context_overflow"]


# --- annotate and rationale (E-step sampling + reward) ----------------------------------------


def test_annotate_gives_every_seed_concepts_and_a_rationale_or_a_reason(settings):
    seeds = [
        SeedProblem(source="gsm8k", source_id=str(i), domain="math", text=t, answer="1")
        for i, t in enumerate(
            [
                "Tom has 3 apples and buys 4 more. How many apples does he have?",
                "A shirt costs $20 and is 25% off. What is the sale price?",
            ]
        )
    ]
    emits = AnnotateStage(settings).process(seeds)
    assert len(emits) == 2
    for e, seed in zip(emits, seeds, strict=True):
        if e.topic is SEEDS_ANNOTATED:
            assert (
                e.record.seed_id == seed.id and len(e.record.concepts) >= 1 and e.record.rationale
            )
        else:
            assert e.record.subject_id == seed.id and e.record.reason


def _manual_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """log p(continuation | prompt) by one forward pass, independent of the backend's code."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert full[: len(p_ids)] == p_ids, "prompt tokens must prefix the full sequence"
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(full[1:])
    token_lp = logprobs[torch.arange(len(full) - 1), targets]
    return float(token_lp[len(p_ids) - 1 :].sum())


def test_rationale_reward_matches_an_independent_recomputation(settings, tiny_model_dir):
    seed = AnnotatedSeed(
        seed_id="seed_x",
        domain="math",
        difficulty="AMC12",
        text="A bag has 3 red and 5 blue marbles. How many marbles are in the bag?",
        concepts=["addition", "counting"],
        rationale="count both colours",
    )
    emits = RationaleStage(settings).process([seed])
    rationales = [e.record for e in emits if e.topic is RATIONALES]
    assert rationales, [e.record for e in emits]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = SYNTHESIS.render(
        tokenizer, **synthesis_fields(seed.concepts, seed.difficulty, seed.domain)
    )
    for r in rationales:
        assert isinstance(r, Rationale) and r.seed_id == "seed_x" and r.difficulty == "AMC12"
        z, x = synthesis_parts(r.text, seed.text)
        logp_z = _manual_logprob(model, tokenizer, prompt, z)
        logp_x = _manual_logprob(model, tokenizer, prompt + z, x)
        assert r.logp_rationale == pytest.approx(logp_z, abs=1e-2, rel=1e-4)
        assert r.logp_problem == pytest.approx(logp_x, abs=1e-2, rel=1e-4)
        assert r.reward == pytest.approx(logp_z + logp_x, abs=2e-2, rel=1e-4)


# --- verify -----------------------------------------------------------------------------------


def test_difficulty_band_is_the_papers_rule():
    assert difficulty_issue(0.0, 0.0, 0.5) == TOO_HARD
    assert difficulty_issue(0.125, 0.0, 0.5) is None
    assert difficulty_issue(0.5, 0.0, 0.5) is None
    assert difficulty_issue(0.625, 0.0, 0.5) == TOO_EASY


def _candidate(problem: str, domain: str = "math", rationale: str = "r") -> CandidateProblem:
    # Candidate ids name the unit of work (concept set, generator): one concept set per problem.
    cs = ConceptSet(domain=domain, concepts=["counting"], difficulty="AMC12", draw=problem)
    return CandidateProblem(
        concept_set_id=cs.id,
        domain=domain,
        difficulty="AMC12",
        concepts=cs.concepts,
        rationale=rationale,
        problem=problem,
        lineage=cs.lineage.extend(cs.id),
    )


def test_verify_math_votes_over_rollouts_and_explains_itself(settings):
    stage = VerifyStage(settings)
    try:
        good, proof = (
            _candidate(
                "Tom has 2 apples and 3 pears. How many fruits?",
                rationale="Add the fruits: 2 + 3 = 5, so the answer is 5.",
            ),
            _candidate("Prove that the sum of two even numbers is even."),
        )
        emits = stage.process([good, proof])
    finally:
        stage.close()
    by_subject = {e.record.subject_id: e.record for e in emits}
    assert set(by_subject) == {good.id, proof.id}
    assert by_subject[proof.id].reason == "proof_problem" and by_subject[proof.id].rollouts == []
    v = by_subject[good.id]
    assert len(v.rollouts) == 4 and 0.0 <= v.pass_rate <= 1.0
    assert (v.reference_answer, v.reference_source) == ("5", "designer")
    assert v.lineage.models["solver"] and "solver_math" in v.lineage.templates
    assert v.reason in {
        "accepted",
        TOO_EASY,
        TOO_HARD,
        "trivial_answer",
        "degenerate_answer",
    }
    agreeing = [r for r in v.rollouts if r.passed]
    assert v.pass_rate == pytest.approx(len(agreeing) / 4)
    for r in v.rollouts:  # each rollout says why it did not pass
        assert r.passed or r.failure in {"truncated", "no_answer", "disagrees"}


def test_verify_code_runs_rollouts_in_the_sandbox(settings):
    stage = VerifyStage(settings)
    try:
        emits = stage.process(
            [_candidate("Read two integers a and b and print their sum.", "code")]
        )
    finally:
        stage.close()
    (verdict,) = [e.record for e in emits]
    assert len(verdict.rollouts) == 4
    assert verdict.reason == "accepted" or verdict.reason in {
        TOO_EASY,
        TOO_HARD,
        "no_valid_tests",
        "no_runnable_rollouts",
    }
    assert "test_writer" in verdict.lineage.models
    for r in verdict.rollouts:
        assert r.passed or r.failure


# --- pairs ------------------------------------------------------------------------------------


def test_pairs_are_distinct_capped_and_in_dpo_shape(settings):
    rollouts = [
        Rollout(text="A \\boxed{5}", passed=True),
        Rollout(text="A \\boxed{5}", passed=True),
        Rollout(text="B \\boxed{5}", passed=True),
        Rollout(text="C \\boxed{6}", answer="6", passed=False, failure="disagrees"),
        Rollout(text="D \\boxed{7}", answer="7", passed=False, failure="disagrees"),
        Rollout(text="E", passed=False, failure="no_answer"),
    ]
    verdict = Verdict(
        subject_id="cand_1",
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        problem="What is 2+3?",
        rollouts=rollouts,
        pass_rate=0.5,
    )
    pairs = build_pairs(verdict, "prompt", cap=4)
    assert len(pairs) == 2  # two distinct passing texts
    assert len({p.chosen for p in pairs}) == 2 and len({p.rejected for p in pairs}) == 2
    assert all(p.chosen != p.rejected for p in pairs) and len({p.id for p in pairs}) == 2
    assert len(build_pairs(verdict, "prompt", cap=1)) == 1
    rejected = verdict.model_copy(update={"accepted": False, "reason": TOO_EASY})
    assert build_pairs(rejected, "prompt", cap=4) == []
    emits = PairsStage(settings).process([verdict])
    row = emits[0].record.model_dump()
    assert {"prompt", "chosen", "rejected"} <= set(row) and "What is 2+3?" in row["prompt"]
    assert len(emits) == 2


def test_pairs_are_labelled_by_the_reference_rejected_is_a_wrong_final_answer(settings):
    """A rollout cut by the budget or stating no answer is not "rejected": it is unfinished,
    and preferring the finished one would teach the solver to stop early, not to be right."""
    rollouts = [
        Rollout(text="A \\boxed{5}", answer="5", passed=True),
        Rollout(text="B \\boxed{5}", answer="5", passed=True),
        Rollout(text="C 2 + 3 = 5 and so on and", passed=False, failure="truncated"),
        Rollout(text="D the sum is 5", passed=False, failure="no_answer"),
        Rollout(text="E \\boxed{6}", answer="6", passed=False, failure="disagrees"),
    ]
    verdict = Verdict(
        subject_id="cand_2",
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        problem="What is 2+3?",
        rollouts=rollouts,
        pass_rate=0.4,
        reference_answer="5",
        reference_source="designer",
    )
    [pair] = build_pairs(verdict, "prompt", cap=4)
    assert (pair.chosen, pair.rejected) == ("A \\boxed{5}", "E \\boxed{6}")
