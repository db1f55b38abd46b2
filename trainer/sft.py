"""The Hugging Face / TRL plumbing every training step shares: training arguments, supervised
fine-tuning on prompt/completion examples, and teacher-forced scoring with an in-memory model.

TRL's SFTTrainer on prompt/completion datasets puts the loss on the completion only and handles
token merges across the prompt/completion boundary. Its fixed cost is about a second per call
(measured on the tiny test model), small next to a window of real training, so a hand-written
loop would buy nothing. torch, transformers and trl are imported only when called.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from typing import Any

from trainer.checkpoints import RoleModel
from trainer.config import StepConfig


def common_training_args(
    cfg: StepConfig, n_examples: int, seed: int, output_dir: str
) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO: CPU-safe (no bf16 autocast, no gradient
    checkpointing: both cost time on CPU and buy nothing at these sizes), no saving by the HF
    Trainer (checkpoints are ours), and an accumulation that still steps on a tiny window."""
    per_device = max(1, min(cfg.per_device_batch_size, n_examples))
    accum = max(1, min(cfg.grad_accum, math.ceil(n_examples / per_device)))
    import torch

    return {
        "output_dir": output_dir,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "learning_rate": cfg.lr,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": cfg.epochs,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
    }


def quiet_datasets() -> None:
    # Per-window dataset maps would otherwise print progress bars into the worker's log.
    import datasets

    datasets.disable_progress_bars()


def sft(rm: RoleModel, examples: list[dict[str, str]], cfg: StepConfig, seed: int = 0) -> float:
    """Fine-tune ``rm.model`` in place on prompt/completion examples; returns the mean training
    loss. The completion-only loss is TRL's default for prompt/completion data."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="promptcot-sft-") as out:
        args = SFTConfig(
            **common_training_args(cfg, len(examples), seed, out),
            max_length=cfg.max_seq_len,
            completion_only_loss=True,
            dataset_num_proc=None,
        )
        trainer = SFTTrainer(
            model=rm.model,
            args=args,
            train_dataset=Dataset.from_list(examples),
            processing_class=rm.tokenizer,
        )
        result = trainer.train()
    rm.model.eval()
    return float(result.training_loss)


def torch_module():
    import torch

    return torch


def continuation_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
) -> tuple[float, int]:
    """(summed NLL, token count) of the continuations given their prompts, teacher-forced.
    A token straddling the boundary counts as continuation (as in the backends' score())."""
    from workers.backends.base import continuation_span

    torch = torch_module()
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                ps = prompts[start : start + batch_size]
                cs = continuations[start : start + batch_size]
                enc = [
                    tokenizer(p + c, add_special_tokens=False, return_offsets_mapping=True)
                    for p, c in zip(ps, cs)
                ]
                width = max(len(e["input_ids"]) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for row, e in enumerate(enc):
                    ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
                    mask[row, : len(e["input_ids"])] = 1
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                for row, (e, p) in enumerate(zip(enc, ps)):
                    first = max(
                        1, continuation_span([tuple(o) for o in e["offset_mapping"]], len(p))
                    )
                    n = len(e["input_ids"])
                    if first >= n:
                        continue
                    total -= float(picked[row, first - 1 : n - 1].sum())
                    count += n - first
    finally:
        model.train(was_training)
    return total, count
