"""Decode budgets fit the cold-start rationales: q_φ's samples (the rationale stage), the
M-step's greedy decode and p_θ's rationale phase never cut a rationale of the kind the cold
start teaches (cut samples are dropped, so a short budget makes best-of-K select for short
rationales, and cuts off the designer's "so the answer is N"). Measured with SmolLM2's own
tokenizer on the held-out pool and the cold-start seeds of each profile."""

from __future__ import annotations

import pytest

from llm.prompts import rationale_completion
from promptcot.settings import Settings
from trainer.coldstart import cold_start_data


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from llm.smollm2 import prepare_smollm2

    return AutoTokenizer.from_pretrained(str(prepare_smollm2()))


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_no_budget_cuts_a_cold_start_rationale(profile, smollm2_tokenizer, tmp_path):
    settings = Settings(
        trainer={"profile": profile, "checkpoint_dir": str(tmp_path)}, metrics={"port": 0}
    )
    data = cold_start_data(settings)
    texts = [rationale_completion(s.rationale) for s in data.triples]
    lengths = [len(i) for i in smollm2_tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert len(lengths) >= settings.trainer.cold_start.seeds // 2
    longest = max(lengths)
    budgets = {
        "rationale.max_tokens": settings.rationale.max_tokens,
        "trainer.m_step.max_rationale_tokens": settings.trainer.m_step.max_rationale_tokens,
        "generation.max_rationale_tokens": settings.generation.max_rationale_tokens,
    }
    assert all(budget >= longest for budget in budgets.values()), (longest, budgets)
