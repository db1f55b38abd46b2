"""The difficulty level means something: every prompt p_θ is trained and scored on names the
seed's own level, and the sampler asks the embedded default for exactly the levels it was
trained on (the gpu profile keeps the paper's ladder, and says which levels no seed carries)."""

from __future__ import annotations

import logging

from scripted_backend import ScriptedBackend

from llm.prompts import SYNTHESIS, synthesis_fields
from llm.roles import Role
from promptcot.settings import Settings
from streams.records import Rationale
from streams.topics import RATIONALES
from trainer.coldstart import cold_start_data
from trainer.em import EMTrainer, SeedItem, Window, prompt_model_example
from workers.concepts import ConceptSampler, load_pool
from workers.settings import CODE_LADDER, MATH_LADDER
from workers.stages.rationale import RationaleStage, reward_inputs
from workers.stages.sampler import unseen_levels

LEVEL_LINE = "Difficulty: grade school\n"


def test_the_embedded_default_asks_for_the_level_it_is_trained_on(tmp_path):
    settings = Settings(
        trainer={"profile": "cpu", "checkpoint_dir": str(tmp_path)}, metrics={"port": 0}
    )
    # Training: the cold-start triples carry their seed's level into p_θ's prompts.
    data = cold_start_data(settings, limit=4)
    assert {s.difficulty for s in data.triples} == {"grade school"}
    cold_start_prompt = prompt_model_example(None, SeedItem.from_annotated(data.seeds[0]))
    assert LEVEL_LINE in cold_start_prompt["prompt"]

    # The E-step: the rationale stage scores R(z) on the same prompt, and its records carry the
    # level to the M-step's targets (and to the next epoch's seeds).
    scripted = ScriptedBackend(lambda prompt, i: f"Plan {i}: add the parts.\n</rationale>")
    stage = RationaleStage(
        settings, backends={Role.RATIONALE_MODEL: scripted, Role.PROMPT_MODEL: scripted}
    )
    emits = stage.process(data.seeds[:2])
    rationales = [e.record for e in emits if e.topic is RATIONALES]
    assert rationales and {r.difficulty for r in rationales} == {"grade school"}
    (scoring_prompt, _), _ = reward_inputs(None, data.seeds[0], "Plan 0: add the parts.")
    assert LEVEL_LINE in scoring_prompt
    window = Window.of(rationales, heldout_fraction=0.0)
    m_step_target = prompt_model_example(None, window.train[0])
    assert LEVEL_LINE in m_step_target["prompt"]
    trainer = EMTrainer(settings.trainer, {})
    assert {s.difficulty for s in trainer.next_epoch_seeds(window)} == {"grade school"}

    # Generation: the sampler asks for that level only, in the same words.
    sampler = ConceptSampler(load_pool(), settings.concepts)
    drawn = [sampler.sample("math") for _ in range(12)]
    assert {cs.difficulty for cs in drawn} == {"grade school"}
    generation_prompt = SYNTHESIS.render(
        None, **synthesis_fields(drawn[0].concepts, drawn[0].difficulty, "math")
    )
    assert LEVEL_LINE in generation_prompt
    assert unseen_levels(settings.concepts.difficulty_ladders, ["math", "code"]) == []


def test_the_gpu_profile_keeps_the_papers_ladder_and_names_the_levels_no_seed_carries(caplog):
    settings = Settings(trainer={"profile": "gpu"}, metrics={"port": 0})
    assert settings.concepts.difficulty_ladders == {"math": MATH_LADDER, "code": CODE_LADDER}
    assert unseen_levels(settings.concepts.difficulty_ladders, ["math"]) == MATH_LADDER
    # A ladder set by hand wins over the profile's, key by key.
    mine = Settings(
        trainer={"profile": "cpu"},
        concepts={"difficulty_ladders": {"math": ["grade school", "AMC12"]}},
        metrics={"port": 0},
    )
    assert mine.concepts.difficulty_ladders["math"] == ["grade school", "AMC12"]
    assert mine.concepts.difficulty_ladders["code"] == ["codeforces"]
    from workers.stages.sampler import SamplerStage

    with caplog.at_level(logging.WARNING, logger="workers.stages.sampler"):
        SamplerStage(mine).setup()
    assert "levels no training seed carries (AMC12)" in caplog.text


def test_a_rationale_record_without_a_level_still_reads():
    """Records written before the level was set carry "" (the old behaviour): still valid."""
    r = Rationale(
        seed_id="seed_x",
        domain="math",
        concepts=["a"],
        problem="p",
        text="z",
        sample_index=0,
        reward=-1.0,
        logp_problem=-0.5,
        logp_rationale=-0.5,
        rationale_model="q",
        prompt_model="p",
    )
    assert r.difficulty == "" and SeedItem.from_rationale(r).difficulty == ""
