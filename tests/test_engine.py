"""The training engine (trainer/engine.py): a window is several optimiser steps of one AdamW per
role that outlives windows and restarts; DPO is anchored to a pinned reference, so its loss moves
off ln 2 within a window and β matters; the LM head runs only at the completion positions, so a
training step's peak does not grow with vocabulary x positions; bf16 autocast is on for every
training, not only a model's first.

Under the cpu profile's own settings where the claim is about them (windows of a handful of
records must learn), on the tests' tiny model (LoRA, as the cpu profile trains).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path

import pytest
from trainer_data import fast, pairs, problem, rationale, trainer_settings

from trainer.checkpoints import CheckpointStore

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

LN2 = math.log(2)
LORA = {"use_lora": True, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def _cpu(tmp_path: Path, model: Path, **trainer: object):
    """The cpu profile, every pair trained on (none held out)."""
    return trainer_settings(tmp_path, model, profile="cpu", heldout_fraction=0.0, **trainer)


def _adapter(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = list(Path(path).glob("*.safetensors"))
    return load_file(str(weights))


def _dpo_window(settings, model: Path, window) -> dict[str, float]:
    from trainer.dpo import DPOTrainerLoop

    loop = DPOTrainerLoop(settings.trainer, str(model))
    (update,) = loop.run_window(window).updates
    return update


# ---------------------------------------------------------------------------------------------
# DPO: off ln 2, β matters, the anchor stays pinned


def test_a_dpo_window_moves_its_loss_below_ln2_and_the_next_window_starts_below(
    tmp_path, tiny_model_dir
):
    """The cpu profile's DPO window of 8 pairs: several optimiser steps, the reference pinned at
    the base (the anchor): the window's loss falls below ln 2, and the next window, anchored to
    the same reference, starts where the first left off instead of at ln 2 again."""
    from trainer.dpo import DPOTrainerLoop

    loop = DPOTrainerLoop(_cpu(tmp_path, tiny_model_dir).trainer, str(tiny_model_dir))
    first = loop.run_window(pairs(8)).updates[-1].metrics
    assert first["train_loss"] < LN2 - 0.01, first
    assert first["train_loss_first"] == pytest.approx(LN2, abs=1e-4)  # at the reference point
    assert first["train_loss_last"] < first["train_loss_first"] - 0.02, first
    second = loop.run_window(pairs(16)[8:]).updates[-1].metrics
    assert second["train_loss_first"] < LN2 - 0.01, second


def test_two_betas_give_different_updates(tmp_path, tiny_model_dir):
    """Adam's first step from fresh moments is about lr * sign(grad), whatever β scales the
    gradient by; a window of several steps on one optimiser feels β."""
    deltas = {}
    for beta in (0.05, 1.0):
        update = _dpo_window(
            _cpu(tmp_path / f"b{beta}", tiny_model_dir, dpo={"beta": beta}),
            tiny_model_dir,
            pairs(8),
        )
        deltas[beta] = _adapter(update.path)
    a, b = deltas[0.05], deltas[1.0]
    lora_b = [k for k in a if "lora_B" in k]  # zero at the start: what the window learned
    moved = max(float(a[k].abs().max()) for k in lora_b)
    apart = max(float((a[k] - b[k]).abs().max()) for k in lora_b)
    assert moved > 0 and apart > 0.2 * moved, (apart, moved)


# ---------------------------------------------------------------------------------------------
# The optimiser outlives windows and restarts


def _two_windows(root: Path, model: Path, restart: bool, forget_moments: bool = False):
    from trainer.dpo import DPOTrainerLoop

    settings = _cpu(root, model)
    loop = DPOTrainerLoop(settings.trainer, str(model))
    loop.run_window(pairs(8))
    if restart:
        del loop
        gc.collect()  # nothing of the first trainer stays in this process
        if forget_moments:
            newest = CheckpointStore(root / "ckpt").latest("solver")
            (newest.path / "optimizer.pt").unlink(missing_ok=True)
        loop = DPOTrainerLoop(settings.trainer, str(model))
    (update,) = loop.run_window(pairs(16)[8:]).updates
    return update


def test_an_optimizer_resumed_after_a_restart_continues_its_moments(tmp_path, tiny_model_dir):
    """Two windows in one trainer, and the same two windows with a restart between them (the
    second trainer loads the first's checkpoint: weights, optimiser moments, schedule position)
    end on the same weights; a restart that lost the moments does not."""
    straight = _two_windows(tmp_path / "straight", tiny_model_dir, restart=False)
    resumed = _two_windows(tmp_path / "resumed", tiny_model_dir, restart=True)
    forgot = _two_windows(tmp_path / "forgot", tiny_model_dir, restart=True, forget_moments=True)
    a, b, c = _adapter(straight.path), _adapter(resumed.path), _adapter(forgot.path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    lora_b = [k for k in a if "lora_B" in k]
    moved = max(float(a[k].abs().max()) for k in lora_b)
    apart = max(float((a[k] - c[k]).abs().max()) for k in lora_b)
    assert apart > 0.05 * moved, (apart, moved)
    assert straight.metrics["optimizer_step"] == resumed.metrics["optimizer_step"]
    assert straight.metrics["optimizer_step"] == 2 * straight.metrics["optimizer_steps"]


# ---------------------------------------------------------------------------------------------
# Memory: the head only where the loss is


def _saved_vocab_tensors(rm, examples, cfg) -> tuple[int, int]:
    """(largest number of elements of a vocabulary-wide tensor saved for backward, rows the LM
    head computed in all) over one SFT call."""
    from trainer.sft import sft

    head = rm.model.get_output_embeddings().weight
    vocab = head.shape[0]
    largest, rows = 0, 0

    def pack(t):
        nonlocal largest
        weight = t.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        if t.dim() >= 2 and t.shape[-1] == vocab and not weight:
            largest = max(largest, t.numel())
        return t

    def head_rows(module, args, output):
        nonlocal rows
        rows += output.numel() // vocab

    hook = rm.model.get_output_embeddings().register_forward_hook(head_rows)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sft(rm, examples, cfg)
    finally:
        hook.remove()
    return largest, rows


def test_a_training_step_never_holds_logits_for_every_position(tmp_path, tiny_model_dir):
    """Long prompts, short completions: what a step saves for backward at vocabulary width does
    not grow with the prompt, and the head computes no more rows than the completions have
    tokens (twice: forward, and again in backward where the chunks are recomputed)."""
    from trainer.role_models import load_role_model
    from trainer.settings import StepConfig

    rm = load_role_model(CheckpointStore(tmp_path), "p", str(tiny_model_dir))
    cfg = StepConfig(**fast(lr=1e-3, epochs=1))
    completions = [rationale(i, 0) for i in range(4)]
    found = {}
    for words in (1, 12):  # the longer within max_seq_len, so nothing is cut
        prompts = [" ".join([problem(i)] * words) for i in range(4)]
        found[words] = _saved_vocab_tensors(
            rm, [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)], cfg
        )
    tokens = sum(
        len(rm.tokenizer(c + rm.tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        for c in completions
    )
    (short_saved, short_rows), (long_saved, long_rows) = found[1], found[12]
    assert long_saved == short_saved and long_rows == short_rows, found
    assert long_saved <= (tokens + 8) * rm.model.get_output_embeddings().weight.shape[0]
    assert long_rows <= 2 * (tokens + 8), (long_rows, tokens)


def test_scoring_applies_the_head_to_the_continuation_positions_only(tmp_path, tiny_model_dir):
    """The held-out signals (problem NLL, rewards, margins) score a continuation after a long
    prompt: the head computes the continuation's rows, never the prompt's, and in chunks."""
    from trainer.em import continuation_nll
    from trainer.role_models import load_role_model

    rm = load_role_model(CheckpointStore(tmp_path), "p", str(tiny_model_dir))
    vocab = rm.model.get_output_embeddings().weight.shape[0]
    calls: list[int] = []
    hook = rm.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: calls.append(output.numel() // vocab)
    )
    prompts = [" ".join([problem(i)] * 12) for i in range(4)]
    conts = [rationale(i, 0) for i in range(4)]
    try:
        _, count = continuation_nll(rm.model, rm.tokenizer, prompts, conts)
    finally:
        hook.remove()
    assert 0 < count < 4 * 40 and sum(calls) == count, (calls, count)


def test_chunked_log_probs_equal_the_full_logits(tmp_path, tiny_model_dir):
    """The head applied at the completion positions in chunks gives the log-probs a full
    forward gives, with and without a LoRA adapter (whose layers the body carries)."""
    from trainer.engine import completion_logps, encode
    from trainer.role_models import load_role_model
    from trainer.settings import LoraConfig

    store = CheckpointStore(tmp_path)
    for use_lora in (False, True):
        rm = load_role_model(
            store, "p", str(tiny_model_dir), use_lora=use_lora, lora=LoraConfig(r=4)
        )
        if use_lora:  # a trained-looking adapter: B is zero at init
            with torch.no_grad():
                for n, p in rm.model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.05)
        rm.model.eval()  # no LoRA dropout
        tok = rm.tokenizer
        batch = [encode(tok, problem(i), rationale(i, 1)) for i in range(3)]
        with torch.no_grad():
            sums, counts = completion_logps(rm.model, batch, pad_id=tok.pad_token_id, chunk=5)
            for row, enc in enumerate(batch):
                ids = torch.tensor([enc.ids])
                logits = rm.model(input_ids=ids).logits.float()
                logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                want = float(logp[enc.first - 1 :].sum())
                assert int(counts[row]) == len(enc.ids) - enc.first
                assert float(sums[row]) == pytest.approx(want, rel=1e-5, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# bf16 autocast on every training


def test_every_training_of_a_model_runs_under_bf16_autocast(tmp_path, tiny_model_dir):
    """The gpu profile's precision on CPU: full fine-tuning of float32 weights under bf16
    autocast, in the second training of a model as in its first (the HF Trainer's accelerator
    wrapped only the first)."""
    from trainer.em import SeedItem, prompt_model_example
    from trainer.engine import EngineOptions
    from trainer.role_models import load_role_model
    from trainer.settings import StepConfig
    from trainer.sft import sft

    rm = load_role_model(CheckpointStore(tmp_path), "p", str(tiny_model_dir), dtype="bfloat16")
    seen: list[tuple[bool, str]] = []

    def hook(module, args, output):
        if module.training:
            seen.append((torch.is_autocast_enabled("cpu"), str(output.dtype)))

    first_linear = next(m for m in rm.model.modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(hook)
    item = SeedItem("s", "math", ["counting"], "", problem(1), rationale(1, 0))
    cfg = StepConfig(**fast(lr=1e-3, epochs=1))
    for _ in range(2):
        seen.clear()
        sft(
            rm, [prompt_model_example(rm.tokenizer, item)] * 4, cfg, EngineOptions(dtype="bfloat16")
        )
        assert seen and set(seen) == {(True, "torch.bfloat16")}, seen
    assert {p.dtype for p in rm.model.parameters()} == {torch.float32}


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path, tiny_model_dir):
    """Recomputing each layer's activations in backward (``trainer.gradient_checkpointing``)
    changes what a step holds, not what it learns; the layers are back to normal after."""
    from trainer.engine import EngineOptions
    from trainer.role_models import load_role_model
    from trainer.settings import LoraConfig, StepConfig
    from trainer.sft import sft

    cfg = StepConfig(**fast(lr=1e-3, steps_per_window=3, use_lora=True))
    examples = [{"prompt": problem(i), "completion": rationale(i, 0)} for i in range(4)]
    trained, layer_calls = [], []
    for checkpointing in (False, True):
        rm = load_role_model(
            CheckpointStore(tmp_path / str(checkpointing)),
            "p",
            str(tiny_model_dir),
            use_lora=True,
            lora=LoraConfig(r=4, dropout=0.0),
        )
        calls: list[int] = []
        # A module inside the layer: the layer's own hooks do not fire on the recompute.
        layer = rm.model.get_base_model().get_decoder().layers[0]
        layer.self_attn.q_proj.register_forward_hook(lambda *args, seen=calls: seen.append(1))
        sft(rm, examples, cfg, EngineOptions(checkpointing=checkpointing))
        assert not rm.model.get_base_model().is_gradient_checkpointing
        trained.append({n: p.detach().clone() for n, p in rm.model.named_parameters()})
        layer_calls.append(len(calls))
    assert layer_calls[1] == 2 * layer_calls[0] > 0  # each layer run again in backward
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=1e-5, atol=1e-6)
