"""One window of each training step moves the signal it is judged by, on items it never trained
on: the E-step raises q_φ's reward on held-out seeds, the M-step lowers p_θ's problem NLL on
held-out seeds, DPO raises the preference margin on held-out pairs. Each figure the trainer
reports is also recomputed independently from the published checkpoint, and the Prometheus
gauges carry the reported values. LoRA, as in the cpu profile (real training, tiny model).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_data import fast, pairs, rationales, trainer_settings

from streams import metrics
from trainer.em import EMTrainer, SeedItem, best_of_k, greedy_reward, problem_nll
from trainer.heldout import is_heldout

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

FRACTION = 0.3
LORA = {"use_lora": True, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> Path:
    """The tiny model pre-trained on the project's formats: LoRA adapts a pre-trained model (as
    in the cpu profile); on random weights a low-rank update learns far less per step."""
    return tiny_model_dir


def _split(n_train: int, n_held: int, prefix: str = "seed") -> list[str]:
    """Seed ids split by the trainer's own hash: n_train trained on, n_held held out."""
    train, held = [], []
    i = 0
    while len(train) < n_train or len(held) < n_held:
        sid = f"{prefix}_{i}"
        (held if is_heldout(sid, FRACTION) else train).append(sid)
        i += 1
    return train[:n_train] + held[:n_held]


def _plan(a: int, k: int) -> str:
    """Candidate rationale k for the seed whose problem starts with ``a`` apples."""
    if k == 0:
        return f"Plan: {a} apples, then {a + 1} more; the question asks for the sum."
    return f"Some thoughts about fruit and baskets, in general terms, variant {k}."


def _gauge(gauge, **labels) -> float:
    return gauge.labels(**labels)._value.get()


def _load(trainer: EMTrainer, role: str):
    from trainer.role_models import load_role_model

    cfg = trainer.settings.e_step
    return load_role_model(
        trainer.store, role, trainer.base_paths[role], use_lora=cfg.use_lora, lora=cfg.lora
    )


def test_e_step_window_raises_the_heldout_reward(tmp_path, tiny_model):
    from trainer.em import mean_reward, prompt_model_example, sft
    from trainer.role_models import save_role_model
    from trainer.settings import StepConfig

    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=FRACTION,
        e_step=fast(lr=1e-2, epochs=8, **LORA),
        m_step=fast(enabled=False, max_rationale_tokens=40, **LORA),
    )
    paths = {"prompt_model": str(tiny_model), "rationale_model": str(tiny_model)}
    trainer = EMTrainer(settings.trainer, paths)
    # K=3 candidates per seed: a plan in the style p_θ was taught (below), and two vaguer ones.
    window = [
        r.model_copy(update={"text": _plan(int(r.problem.split()[2]), r.sample_index)})
        for r in rationales(_split(6, 2), k=3)
    ]
    # p_θ learned the plan style (a cold start of p_θ alone); q_φ has never seen it.
    p = trainer.model("prompt_model", settings.trainer.e_step)
    items = [SeedItem.from_rationale(r) for r in window if r.sample_index == 0]
    cfg = StepConfig(**fast(lr=1e-2, epochs=10))
    sft(p, [prompt_model_example(p.tokenizer, i) for i in items], cfg)
    save_role_model(trainer.store, p, "cold_start")
    # The rewards are R(z) under that p_θ, so best-of-K selects what p_θ finds likely.
    window = [
        r.model_copy(update={"reward": mean_reward(p, [SeedItem.from_rationale(r)])})
        for r in window
    ]
    assert all(r.sample_index == 0 for r in best_of_k(window).values())

    (update,) = trainer.run_window(window).updates
    m = update.metrics
    assert update.step == "e_step" and m["n_seeds"] == 6
    # q_φ's greedy rationales were worse than the best samples; one window moves it towards them.
    assert m["mean_best_reward"] > m["heldout_reward_before"] + 20.0, m
    assert m["heldout_reward_after"] > m["heldout_reward_before"] + 20.0, m
    # Recomputed from disk: the published q_φ, scored under the saved p_θ.
    held = [SeedItem(**row) for row in trainer.heldout.items()]
    assert len(held) == 2
    fresh = EMTrainer(settings.trainer, paths)
    q, p = _load(fresh, "rationale_model"), _load(fresh, "prompt_model")
    reward, tokens = greedy_reward(q, p, held, 40, 8)
    assert reward == pytest.approx(m["heldout_reward_after"], rel=1e-3)
    assert _gauge(metrics.TRAINER_REWARD, role="rationale_model") == pytest.approx(
        m["heldout_reward_after"]
    )
    # The mean rationale length is reported beside the reward (a "shorter" reward rise shows).
    assert tokens == pytest.approx(m["heldout_rationale_tokens_after"])
    assert m["heldout_rationale_tokens_before"] > 0 and m["mean_best_rationale_tokens"] > 0
    assert m["mean_sampled_rationale_tokens"] > 0
    assert _gauge(metrics.TRAINER_RATIONALE_TOKENS, role="rationale_model") == pytest.approx(tokens)
    assert _gauge(metrics.MODEL_VERSION, role="rationale_model") == 1


def test_m_step_window_lowers_the_heldout_problem_nll(tmp_path, tiny_model):
    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=FRACTION,
        e_step=fast(enabled=False, **LORA),
        m_step=fast(lr=5e-3, epochs=4, max_rationale_tokens=8, **LORA),
    )
    paths = {"prompt_model": str(tiny_model), "rationale_model": str(tiny_model)}
    trainer = EMTrainer(settings.trainer, paths)
    ids = _split(5, 2)
    held = [SeedItem.from_rationale(r) for s, r in best_of_k(rationales(ids)).items()]
    held = [i for i in held if is_heldout(i.seed_id, FRACTION)]
    base = _load(trainer, "prompt_model")
    nll_base = problem_nll(base.model, base.tokenizer, sorted(held, key=lambda i: i.seed_id))

    (update,) = trainer.run_window(rationales(ids)).updates
    m = update.metrics
    assert update.step == "m_step" and m["n_seeds"] == 5 and m["n_heldout"] == 2
    assert m["heldout_problem_nll_before"] == pytest.approx(nll_base, rel=1e-5)
    assert m["heldout_problem_nll_after"] < m["heldout_problem_nll_before"] - 0.5, m
    p = _load(EMTrainer(settings.trainer, paths), "prompt_model")
    pool = [SeedItem(**row) for row in trainer.heldout.items()]
    assert problem_nll(p.model, p.tokenizer, pool) == pytest.approx(
        m["heldout_problem_nll_after"], rel=1e-4
    )
    assert _gauge(metrics.TRAINER_HELDOUT_NLL, role="prompt_model") == pytest.approx(
        m["heldout_problem_nll_after"]
    )
    assert _gauge(metrics.TRAINER_LOSS, role="prompt_model", step="m_step") == m["train_loss"]


def test_dpo_window_raises_the_margin_on_heldout_pairs(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dpo import DPOTrainerLoop, dpo_rows, preference_margin

    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=FRACTION,
        dpo=fast(lr=5e-3, epochs=3, window={"min_records": 4}, beta=0.1, **LORA),
    )
    loop = DPOTrainerLoop(settings.trainer, str(tiny_model))
    window = pairs(12)
    held = [p for p in window if is_heldout(p.problem_id, FRACTION)]
    assert 1 <= len(held) < len(window) - 4
    (update,) = loop.run_window(window).updates
    m = update.metrics
    assert m["n_pairs"] == len(window) - len(held) and m["n_heldout_pairs"] == len(held)
    assert m["heldout_margin_after"] > m["heldout_margin_before"] + 1.0, m
    # Independently: base weights vs the published adapter, on the held-out pairs only.
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    rows = dpo_rows(tok, held)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    before = preference_margin(base, tok, rows)
    trained = PeftModel.from_pretrained(base, update.path)
    assert preference_margin(trained, tok, rows) > before + 1.0
    assert _gauge(metrics.TRAINER_MARGIN, role="solver") == pytest.approx(m["heldout_margin_after"])


def test_the_heldout_gauges_carry_heldout_figures_only():
    """promptcot_trainer_heldout_nll and _margin are set from held-out measurements only: a
    window measured on its training items (no held-out pool yet) leaves them as they were."""
    from streams.records import ModelUpdate
    from trainer.updates import publish_metrics

    def update(role: str, step: str, **m: float) -> ModelUpdate:
        return ModelUpdate(
            role=role, version=f"{role}/v0001-{step}", path="/x", step=step, metrics=m
        )

    role_p, role_s = "gauge_test_prompt_model", "gauge_test_solver"
    publish_metrics(update(role_p, "m_step", heldout_problem_nll_after=2.5))
    publish_metrics(update(role_s, "dpo", heldout_margin_after=0.75))
    publish_metrics(update(role_p, "m_step", train_problem_nll_after=9.0))
    publish_metrics(update(role_s, "dpo", train_margin_after=-3.0))
    assert _gauge(metrics.TRAINER_HELDOUT_NLL, role=role_p) == 2.5
    assert _gauge(metrics.TRAINER_MARGIN, role=role_s) == 0.75
