"""Trainer: best-of-K selection, atomic/pruned checkpoints, an EM window (E-step + M-step) whose
checkpoints reload and generate, the held-out NLL convergence signal, DPO raising the preference
margin, and the trainer stages end to end on a tiny from-scratch Llama (real training on the
engine, trainer/engine.py).

The model is built by tests/trainer_data.py (hidden 64, 2 layers, ~0.1M params, random weights):
these tests only need a model that learns, and building it takes about a second.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # the machine is shared; these models are tiny

from trainer_data import (
    build_tiny_model,
    fast,
    pairs,
    problem,
    rationale,
    rationales,
    trainer_settings,
)

from llm import prompts as P
from llm.backends.base import BackendSettings
from streams.records import ModelUpdate, version_number
from streams.topics import MODELS, SEEDS_ANNOTATED
from trainer.checkpoints import CheckpointStore
from trainer.em import EMTrainer, SeedItem, best_of_k, problem_nll
from trainer.heldout import is_heldout
from trainer.settings import StepConfig
from trainer.stages import DPOStage, EStepStage
from workers.reload import ModelFollower


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_best_of_k_picks_the_max_reward_rationale_per_seed():
    rs = rationales(["s1", "s2", "s3"], k=4)
    rs[0] = rs[0].model_copy(update={"reward": -1.0})  # s1 sample 0: a clear winner
    top_s2 = max((r for r in rs if r.seed_id == "s2"), key=lambda r: r.reward)
    rs.append(top_s2.model_copy(update={"text": "tie", "sample_index": 9}))  # same reward, later
    rs.append(rs[1].model_copy(update={"text": "nan one", "reward": float("nan")}))
    best = best_of_k(rs)
    assert set(best) == {"s1", "s2", "s3"}
    for sid, chosen in best.items():
        group = [r for r in rs if r.seed_id == sid and math.isfinite(r.reward)]
        assert chosen.reward == max(r.reward for r in group)
        # ties resolve to the lowest sample index: deterministic under redelivery
        assert chosen.sample_index == min(
            r.sample_index for r in group if r.reward == chosen.reward
        )
    assert best["s1"].sample_index == 0 and best["s1"].reward == -1.0
    assert best["s2"].text == top_s2.text  # the tie went to the earlier sample
    assert best_of_k([rs[-1]]) == {}  # a NaN reward (failed scoring) never wins


def test_heldout_split_is_deterministic_and_near_its_fraction():
    ids = [f"seed_{i}" for i in range(2000)]
    share = sum(is_heldout(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < share < 0.13
    assert [is_heldout(i, 0.1) for i in ids[:50]] == [is_heldout(i, 0.1) for i in ids[:50]]
    assert not any(is_heldout(i, 0.0) for i in ids)


def test_checkpoints_are_atomic_versioned_and_pruned(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)

    def write(d: Path) -> None:
        (d / "weights.bin").write_bytes(b"x" * 10)

    def broken(d: Path) -> None:
        (d / "weights.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.save("solver", "dpo", broken)
    assert list((tmp_path / "solver").iterdir()) == []  # nothing half-written is left
    assert store.latest("solver") is None

    saved = [store.save("solver", "dpo", write, {"metrics": {"i": i}}) for i in range(4)]
    assert [c.version for c in saved] == [1, 2, 3, 4]
    assert saved[-1].path.name == "v0004-dpo" and saved[-1].version_string == "solver/v0004-dpo"
    assert version_number(saved[-1].version_string) == 4
    assert [c.version for c in store.list("solver")] == [3, 4]  # pruned to keep_last
    assert not saved[0].path.exists() and saved[-1].path.exists()
    # An in-progress write (hidden tmp folder, no manifest) is invisible to readers.
    (tmp_path / "solver" / ".tmp-dpo-xyz").mkdir()
    (tmp_path / "solver" / "v0009-dpo").mkdir()  # a folder without manifest is not a checkpoint
    assert store.latest("solver").version == 4
    assert store.save("solver", "dpo", write).version == 10  # a number is never reused
    assert (
        json.loads((store.latest("solver").path / "checkpoint.json").read_text())["role"]
        == "solver"
    )


# ---------------------------------------------------------------------------------------------
# EM


def _reload_and_generate(path: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    item = SeedItem("s", "math", ["addition"], "", problem(0), "")
    prompt = P.SYNTHESIS.render(tok, **P.synthesis_fields(item.concepts, "", "math"))
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_em_stage_window_emits_updates_whose_checkpoints_reload_and_generate(tmp_path, tiny_model):
    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=0.0,
        e_step=fast(window={"min_records": 4}),
        m_step=fast(max_rationale_tokens=24),
    )
    stage = EStepStage(settings)
    # Too small a window trains nothing (a log line, not an error); its seed goes round again.
    small = stage.process(rationales(["a"], k=3))
    assert [(e.topic, e.record.seed_id, e.record.epoch) for e in small] == [
        (SEEDS_ANNOTATED, "a", 1)
    ]
    assert not (tmp_path / "ckpt").exists()

    window = rationales(["s1", "s2", "s3"], k=3)
    emits = stage.process(window)
    updates = [e.record for e in emits if e.topic is MODELS]
    assert [(u.role, u.step) for u in updates] == [
        ("rationale_model", "e_step"),
        ("prompt_model", "m_step"),
    ]
    for u in updates:
        assert isinstance(u, ModelUpdate) and Path(u.path).is_dir()
        assert u.version == f"{u.role}/v0001-{u.step}" and u.lineage.models[u.role] == u.version
        assert len(u.parent_ids) == 3  # the best-of-K rationale of each seed
        _reload_and_generate(u.path)
    m = updates[1].metrics
    assert m["n_seeds"] == 3 and "train_problem_nll_after" in m and m["train_loss"] > 0
    # Every seed of the window goes round again, one epoch on, with an id of its own.
    again = [e.record for e in emits if e.topic is SEEDS_ANNOTATED]
    assert sorted((a.seed_id, a.epoch) for a in again) == [("s1", 1), ("s2", 1), ("s3", 1)]
    assert not {a.id for a in again} & {e.record.id for e in small}

    # A second window continues from the in-memory models and numbers the next version.
    more = [e.record for e in stage.process(rationales(["s4", "s5"], k=2)) if e.topic is MODELS]
    assert [u.version for u in more] == [
        "rationale_model/v0002-e_step",
        "prompt_model/v0002-m_step",
    ]

    # A restarted trainer resumes from the newest checkpoint, not the base model.
    fresh = EMTrainer(
        settings.trainer, {"prompt_model": str(tiny_model), "rationale_model": str(tiny_model)}
    )
    rm = fresh.model("prompt_model", settings.trainer.m_step)
    assert rm.checkpoint is not None and rm.checkpoint.version == 2
    # At-least-once delivery: a redelivered window is recognised (in memory, and from the
    # checkpoint manifests after a restart): not trained twice, its versions announced again
    # with the same ids.
    replay = [e.record for e in stage.process(window) if e.topic is MODELS]
    assert [u.id for u in replay] == [u.id for u in updates]
    result = fresh.run_window(window)
    assert "already trained" in (result.skipped or "")
    assert [u.id for u in result.updates] == [u.id for u in updates]
    assert [c.version for c in fresh.store.list("prompt_model")] == [1, 2]


def test_m_step_lowers_heldout_problem_nll(tmp_path, tiny_model):
    # Seeds split by the same hash the trainer uses: 5 to train on, 2 never trained on.
    train_ids, held_ids = [], []
    i = 0
    while len(train_ids) < 5 or len(held_ids) < 2:
        sid = f"seed_{i}"
        (held_ids if is_heldout(sid, 0.3) else train_ids).append(sid)
        i += 1
    ids = train_ids[:5] + held_ids[:2]
    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=0.3,
        e_step=fast(enabled=False),
        m_step=fast(lr=3e-3, epochs=6, max_rationale_tokens=8),
    )
    trainer = EMTrainer(
        settings.trainer, {"prompt_model": str(tiny_model), "rationale_model": str(tiny_model)}
    )
    best = best_of_k(rationales(ids))
    held = [SeedItem.from_rationale(best[s]) for s in held_ids[:2]]
    p0 = trainer.model("prompt_model", settings.trainer.m_step)
    nll_base = problem_nll(p0.model, p0.tokenizer, held)

    result = trainer.run_window(rationales(ids))
    m = result.metrics
    assert m["n_seeds"] == 5 and m["n_heldout"] == 2
    assert m["heldout_problem_nll_before"] == pytest.approx(nll_base, rel=1e-5)
    assert m["heldout_problem_nll_after"] < m["heldout_problem_nll_before"] - 0.5
    # On the seeds it trained on, the NLL falls further than on the held-out ones.
    fit = m["window_problem_nll_before"] - m["window_problem_nll_after"]
    assert fit > m["heldout_problem_nll_before"] - m["heldout_problem_nll_after"], m
    # The metric travels on the update, and the saved p_θ reproduces it from disk.
    update = result.updates[-1]
    assert update.metrics["heldout_problem_nll_after"] == pytest.approx(
        m["heldout_problem_nll_after"]
    )
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(update.path, local_files_only=True)
    assert problem_nll(reloaded, p0.tokenizer, held) == pytest.approx(
        m["heldout_problem_nll_after"], rel=1e-4
    )


# ---------------------------------------------------------------------------------------------
# DPO and reload


def test_dpo_stage_raises_the_preference_margin(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.dpo import dpo_rows, preference_margin

    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=0.0,
        dpo=fast(lr=2e-3, epochs=3, window={"min_records": 4}, beta=0.1),
    )
    stage = DPOStage(settings)
    assert stage.process(pairs(2)) == []  # under min_records: skipped
    emits = stage.process(pairs(6))
    assert len(emits) == 1
    # Redelivered: not trained twice, the version announced again with the same id.
    assert [e.record.id for e in stage.process(pairs(6))] == [emits[0].record.id]
    assert [c.version for c in CheckpointStore(tmp_path / "ckpt").list("solver")] == [1]
    update = emits[0].record
    assert update.role == "solver" and update.step == "dpo" and Path(update.path).is_dir()
    assert update.metrics["train_margin_after"] > update.metrics["train_margin_before"] + 1.0

    # Measured independently: base weights vs the published checkpoint, on the training pairs.
    tok = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    rows = dpo_rows(tok, pairs(6))
    assert rows[0]["prompt"].startswith("<|im_start|>system\n" + P.SOLVER_MATH.system)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    trained = AutoModelForCausalLM.from_pretrained(update.path, local_files_only=True)
    assert preference_margin(trained, tok, rows) > preference_margin(base, tok, rows) + 1.0


def test_dpo_window_refilled_after_a_crash_reannounces_and_trains_its_new_pairs(
    tmp_path, tiny_model
):
    """A redelivered window may come back with a different make-up (later pairs refill it):
    the version that trained on part of it is announced again, and its new pairs are trained
    even when they are fewer than min_records (the window they arrived in was big enough).
    A window whose usable fresh pairs are under min_records, with nothing of it trained
    before, trains nothing."""
    settings = trainer_settings(
        tmp_path,
        tiny_model,
        heldout_fraction=0.0,
        dpo=fast(lr=2e-3, epochs=1, window={"min_records": 4}, beta=0.1),
    )
    stage = DPOStage(settings)
    first = [e.record for e in stage.process(pairs(6))]
    assert len(first) == 1
    later = pairs(9)[6:]
    refilled = [e.record for e in stage.process(pairs(6)[:2] + later[:1])]
    assert [u.id for u in refilled][:1] == [first[0].id]
    assert len(refilled) == 2 and refilled[1].version.endswith("v0002-dpo")
    assert set(refilled[1].parent_ids) == {later[0].id}
    # Four new pairs, of which only three are usable (one has chosen == rejected).
    equal = later[2].model_copy(update={"rejected": later[2].chosen})
    assert stage.process([*pairs(12)[9:], equal]) == []
    assert [c.version for c in CheckpointStore(tmp_path / "ckpt").list("solver")] == [1, 2]


def test_dpo_heldout_pool_keeps_each_pair_under_its_own_id(tmp_path, tiny_model):
    """Held-out pairs go to the pool keyed by their own id, even when a pair before them is
    dropped as unusable (chosen == rejected)."""
    from trainer.dpo import DPOTrainerLoop

    settings = trainer_settings(tmp_path, tiny_model, heldout_fraction=1.0)
    window = pairs(3)
    window[0] = window[0].model_copy(update={"rejected": window[0].chosen})
    loop = DPOTrainerLoop(settings.trainer, str(tiny_model))
    assert loop.run_window(window).updates == []
    rows = [json.loads(line) for line in loop.heldout.path.read_text().splitlines()]
    assert {r["key"]: r["item"]["chosen"] for r in rows} == {p.id: p.chosen for p in window[1:]}


def test_trainer_stages_respect_the_enabled_switch(tmp_path, tiny_model):
    settings = trainer_settings(tmp_path, tiny_model, enabled=False)
    assert EStepStage(settings).process(rationales(["s1", "s2", "s3"], k=4)) == []
    assert DPOStage(settings).process(pairs(8)) == []
    assert not (tmp_path / "ckpt").exists()


def lora_dpo_settings(tmp_path: Path, model: Path, epochs: float, min_records: int):
    """DPO of a LoRA adapter (r 8) on every pair (none held out)."""
    return trainer_settings(
        tmp_path,
        model,
        heldout_fraction=0.0,
        dpo=fast(
            lr=5e-3,
            epochs=epochs,
            use_lora=True,
            lora={"r": 8, "alpha": 16, "dropout": 0.0},
            window={"min_records": min_records},
        ),
    )


def test_lora_dpo_checkpoint_is_an_adapter_a_real_backend_reloads(tmp_path, tiny_model):
    from llm.backends.transformers_backend import TransformersBackend

    settings = lora_dpo_settings(tmp_path, tiny_model, epochs=3, min_records=4)
    update = DPOStage(settings).process(pairs(6))[0].record
    folder = Path(update.path)
    assert (folder / "adapter_config.json").is_file() and not (
        folder / "model.safetensors"
    ).exists()
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["adapter"] is True and manifest["base_model"] == str(tiny_model)
    assert update.metrics["train_margin_after"] > update.metrics["train_margin_before"]

    backend = TransformersBackend(BackendSettings(model=str(tiny_model)))
    before = backend.model_version
    prompt = P.SOLVER_MATH.render(backend, problem=problem(0))
    base_score = backend.score([prompt], [pairs(1)[0].chosen])[0].total_logprob
    ModelFollower(SimpleNamespace(), backends={"solver": backend}).apply([update])
    assert backend.model_version != before and "+lora:" in backend.model_version
    # The reloaded backend serves the trained weights: the chosen answer got likelier.
    assert backend.score([prompt], [pairs(1)[0].chosen])[0].total_logprob > base_score
    assert backend.generate([prompt], max_tokens=4, temperature=0)[0][0].n_completion_tokens > 0


def test_lora_dpo_trains_window_after_window_on_the_same_adapter(tmp_path, tiny_model):
    """The solver kept in memory trains window after window on its one adapter. Its anchor is
    re-pinned every 2 windows: windows 1-2 against the base (the adapter switched off), window 3
    against v2 (the policy itself, before it trains), window 4 against v2 while the policy is v3:
    v2 is a second, frozen adapter on the same model, and no checkpoint carries it (peft saves
    every adapter it holds unless told which: a subfolder per extra adapter, as TRL's "ref" copy
    once left in every checkpoint)."""
    settings = lora_dpo_settings(tmp_path, tiny_model, epochs=1, min_records=2)
    settings.trainer.dpo.anchor_refresh_windows = 2
    settings.trainer.keep_last = 4
    stage = DPOStage(settings)
    updates = [stage.process(pairs(12)[3 * w : 3 * w + 3])[0].record for w in range(4)]
    assert [u.version[-9:] for u in updates] == [f"v000{i}-dpo" for i in range(1, 5)]
    anchors = []
    for update in updates:
        folder = Path(update.path)
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == []
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
        anchor = json.loads((folder / "checkpoint.json").read_text())["anchor"]
        anchors.append((anchor["version"], anchor["windows"]))
    v2 = updates[1].version
    assert anchors == [("solver/base", 1), ("solver/base", 2), (v2, 1), (v2, 2)]
    assert set(stage.trainer.solver.model.peft_config) == {"default", "anchor"}


def test_trainers_sharing_a_process_take_turns(tmp_path, tiny_model):
    """`promptcot up` runs the em and dpo stages as threads of one process. With the HF Trainer a
    DPO window that started while an SFT trained broke the SFT mid-epoch (its accelerator state
    was process-wide); the engine's windows take turns (trainer/engine.py, TRAINING_LOCK: a
    window seeds torch's process-wide RNG for its steps)."""
    import threading

    from trainer.dpo import dpo_rows, dpo_train
    from trainer.role_models import load_role_model
    from trainer.sft import sft

    settings = trainer_settings(tmp_path, tiny_model, dpo=fast(epochs=1))
    store = CheckpointStore(tmp_path / "ckpt")
    policy = load_role_model(store, "prompt_model", str(tiny_model))
    solver = load_role_model(store, "solver", str(tiny_model))
    examples = [{"prompt": problem(i), "completion": rationale(i, 0)} for i in range(64)]
    rows = dpo_rows(solver.tokenizer, pairs(4))
    failures: list[BaseException] = []
    started = threading.Event()

    def long_sft() -> None:
        started.set()
        try:
            sft(policy, examples, StepConfig(**fast(epochs=8, per_device_batch_size=1)))
        except BaseException as exc:  # noqa: BLE001  (the assertion below reports it)
            failures.append(exc)

    worker = threading.Thread(target=long_sft)
    worker.start()
    started.wait()
    for _ in range(3):
        dpo_train(solver, rows, settings.trainer)
    worker.join()
    assert failures == []


def test_tokenizer_end_of_turn_is_normalized_for_chatml(tiny_model):
    from transformers import AutoTokenizer

    from trainer.role_models import normalize_end_of_turn

    tok = AutoTokenizer.from_pretrained(str(tiny_model), local_files_only=True)
    tok.eos_token = "<|im_start|>"  # what the GGUF-converted SmolLM2 folder says
    normalize_end_of_turn(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_cold_start_trains_both_models_on_annotated_seeds(tmp_path, tiny_model):
    from streams.records import AnnotatedSeed

    seeds = [
        AnnotatedSeed(
            seed_id=f"cs_{i}",
            domain="math",
            text=problem(i),
            concepts=["addition of whole numbers", "counting"],
            rationale=rationale(i, 0),
        )
        for i in range(4)
    ]
    settings = trainer_settings(
        tmp_path, tiny_model, heldout_fraction=0.0, cold_start=fast(lr=3e-3, epochs=4)
    )
    trainer = EMTrainer(
        settings.trainer, {"prompt_model": str(tiny_model), "rationale_model": str(tiny_model)}
    )
    updates = trainer.cold_start(seeds)
    assert [(u.role, u.step) for u in updates] == [
        ("rationale_model", "cold_start"),
        ("prompt_model", "cold_start"),
    ]
    assert all(Path(u.path).is_dir() for u in updates)
    m = updates[1].metrics
    assert m["train_problem_nll_after"] < m["train_problem_nll_before"] - 0.5


def test_m_step_decodes_the_rationale_q_phi_learned(tmp_path, tiny_model):
    from trainer.em import greedy_rationales, rationale_model_example, sft
    from trainer.role_models import load_role_model
    from trainer.settings import StepConfig

    item = SeedItem(
        "s", "math", ["addition of whole numbers", "counting"], "", problem(1), rationale(1, 0)
    )
    q = load_role_model(CheckpointStore(tmp_path), "rationale_model", str(tiny_model))
    assert greedy_rationales(q.model, q.tokenizer, [item], max_new_tokens=40) == [None]
    # A constant rate (a stream has no last step to decay to; the HF Trainer decayed 1e-2 to 0
    # within the call): 5e-3 for 40 steps fits the one example.
    cfg = StepConfig(lr=5e-3, epochs=40, batch_size=1, per_device_batch_size=1, max_seq_len=512)
    sft(q, [rationale_model_example(q.tokenizer, item)], cfg)
    # Stopped at </rationale> and parsed: exactly the text the M-step trains p_θ on.
    assert greedy_rationales(q.model, q.tokenizer, [item], max_new_tokens=60) == [item.rationale]


def test_a_lora_checkpoint_is_served_on_the_base_it_names(tmp_path, tiny_model):
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llm.backends.transformers_backend import TransformersBackend

    # Another version with full weights (what a backend may serve when an adapter arrives).
    other = tmp_path / "v0002-dpo"
    shutil.copytree(tiny_model, other)
    model = AutoModelForCausalLM.from_pretrained(str(other), local_files_only=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(str(other))
    # An adapter trained on the base model; fresh LoRA B matrices are zero: base + it = base.
    adapter = tmp_path / "v0003-dpo"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), local_files_only=True)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(adapter))

    served = TransformersBackend(BackendSettings(model=str(tiny_model)))
    prompt = P.SOLVER_MATH.render(served, problem=problem(0))
    want = served.score([prompt], [pairs(1)[0].chosen])[0].total_logprob
    backend = TransformersBackend(BackendSettings(model=str(other)))
    assert backend.score([prompt], [pairs(1)[0].chosen])[0].total_logprob != pytest.approx(want)
    backend.reload(str(adapter))
    assert backend.score([prompt], [pairs(1)[0].chosen])[0].total_logprob == pytest.approx(want)
    assert backend.model_version.startswith(served.model_version + "+lora:")
    # Named directly, an adapter folder is served on its base too (what `promptcot eval` loads).
    direct = TransformersBackend(BackendSettings(model=str(adapter)))
    assert direct.score([prompt], [pairs(1)[0].chosen])[0].total_logprob == pytest.approx(want)


def test_an_adapter_merged_away_for_full_fine_tuning_trains_float32_weights(tmp_path, tiny_model):
    """LoRA switched off after an adapter checkpoint, dtype bfloat16: the base loads in bf16
    for the merge, and the merged model full fine-tuning trains is float32 again."""
    from trainer.role_models import load_role_model, save_role_model
    from trainer.settings import LoraConfig

    store = CheckpointStore(tmp_path)
    lora = load_role_model(store, "p", str(tiny_model), use_lora=True, lora=LoraConfig(r=4))
    save_role_model(store, lora, "dpo")
    full = load_role_model(store, "p", str(tiny_model), use_lora=False, dtype="bfloat16")
    assert not hasattr(full.model, "peft_config")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}


def test_bf16_profile_keeps_trained_weights_in_float32_and_trains_under_autocast(
    tmp_path, tiny_model
):
    """The gpu profile's dtype on CPU (where it is slow but runs): a LoRA base loads in bf16,
    trained weights stay float32, training runs under bf16 autocast, and scoring and greedy
    decoding put their inputs on the model's own device."""
    from trainer.em import greedy_rationales, prompt_model_example, sft
    from trainer.engine import EngineOptions
    from trainer.role_models import load_role_model
    from trainer.settings import LoraConfig, StepConfig

    store = CheckpointStore(tmp_path)
    lora = load_role_model(
        store, "p", str(tiny_model), use_lora=True, lora=LoraConfig(r=4), dtype="bfloat16"
    )
    dtypes = {n: p.dtype for n, p in lora.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    full = load_role_model(store, "q", str(tiny_model), dtype="bfloat16")
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    cfg = StepConfig(**fast(lr=1e-2, epochs=2, use_lora=True))
    item = SeedItem("s", "math", ["counting"], "", problem(1), rationale(1, 0))
    before = problem_nll(lora.model, lora.tokenizer, [item])
    options = EngineOptions(dtype="bfloat16")
    loss = sft(lora, [prompt_model_example(lora.tokenizer, item)] * 4, cfg, options)
    assert math.isfinite(loss.mean) and problem_nll(lora.model, lora.tokenizer, [item]) < before
    assert len(greedy_rationales(lora.model, lora.tokenizer, [item], max_new_tokens=4)) == 1
