"""The Hugging Face / TRL plumbing every training step shares: training arguments, supervised
fine-tuning on prompt/completion examples, and teacher-forced scoring with an in-memory model.

TRL's SFTTrainer on prompt/completion datasets puts the loss on the completion only and handles
token merges across the prompt/completion boundary. Its fixed cost is about a second per call
(measured on the tiny test model), small next to a window of real training, so a hand-written
loop would buy nothing. torch, transformers and trl are imported only when called.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

from trainer.role_models import RoleModel
from trainer.settings import StepConfig

log = logging.getLogger(__name__)

# (what is being done, done so far, of how many; 0: not known): how long work such as the cold
# start reports its progress to whoever shows it (`up`'s console: promptcot/progress.py).
Report = Callable[[str, int, int], None]
StepReport = Callable[[int, int], None]  # (optimizer steps done, steps in all)


def model_device(model: Any) -> Any:
    """The device a (peft-wrapped) model's weights are on: inputs go there."""
    return next(model.parameters()).device


def common_training_args(
    cfg: StepConfig,
    n_examples: int,
    seed: int,
    output_dir: str,
    *,
    model: Any,
    dtype: str = "float32",
) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO: on the model's own device (the trainer placed
    it: trainer/role_models.py), bf16 autocast when ``dtype`` says so, no gradient checkpointing
    (costs time and buys nothing at these sizes), no saving by the HF Trainer (checkpoints are
    ours), and an accumulation that still steps on a tiny window."""
    per_device = max(1, min(cfg.per_device_batch_size, n_examples))
    accum = max(1, min(cfg.grad_accum, math.ceil(n_examples / per_device)))
    return {
        "output_dir": output_dir,
        "use_cpu": model_device(model).type == "cpu",
        "report_to": "none",
        "bf16": dtype == "bfloat16",
        "gradient_checkpointing": False,
        "learning_rate": cfg.lr,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": cfg.epochs,
        "warmup_steps": cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "save_strategy": "no",
        "logging_strategy": "no",  # the mean loss comes back from train(); no log lines
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
    }


# One HF/TRL training at a time in a process (`promptcot up` runs the em and dpo stages as
# threads of one): every new TrainingArguments resets the accelerator state that is shared by
# the whole process, under the feet of a training in progress, and TRL's lazily imported names
# can fail to import from two threads at once.
TRAINING_LOCK = threading.RLock()


def report_to_log(trainer: Any, on_step: StepReport | None = None) -> None:
    """The HF trainer's own output goes to this module's logger instead of stdout: with
    ``disable_tqdm`` it installs PrinterCallback, which prints every log dict (the training
    metrics at the end of each call). ``on_step`` hears of each optimizer step."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class LogAndReport(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                log.info("training: %s", {k: v for k, v in logs.items() if k != "total_flos"})

        def on_train_begin(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(0, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(state.global_step, state.max_steps)

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogAndReport())


def quiet_datasets() -> None:
    # Per-window dataset maps would otherwise print progress bars into the worker's log.
    import datasets

    datasets.disable_progress_bars()


def sft(
    rm: RoleModel,
    examples: list[dict[str, str]],
    cfg: StepConfig,
    seed: int = 0,
    dtype: str = "float32",
    on_step: StepReport | None = None,
) -> float:
    """Fine-tune ``rm.model`` in place on prompt/completion examples; returns the mean training
    loss. The completion-only loss is TRL's default for prompt/completion data."""
    with TRAINING_LOCK:
        return _sft(rm, examples, cfg, seed, dtype, on_step)


def _sft(
    rm: RoleModel,
    examples: list[dict[str, str]],
    cfg: StepConfig,
    seed: int,
    dtype: str,
    on_step: StepReport | None,
) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="promptcot-sft-") as out:
        args = SFTConfig(
            **common_training_args(cfg, len(examples), seed, out, model=rm.model, dtype=dtype),
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
        report_to_log(trainer, on_step)
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
    from llm.backends.base import continuation_span

    torch = torch_module()
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = model_device(model)
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
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
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


def greedy_decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
) -> list[tuple[str, bool]]:
    """(text, finished) per prompt, decoded greedily on the model's device: the text is cut at
    the first stop string; ``finished`` is False when the token budget ran out first."""
    from llm.backends.base import truncate_at_stop

    torch = torch_module()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = {i for i in (tokenizer.eos_token_id, eos) if isinstance(i, int) and i >= 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[tuple[str, bool]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = [
                    tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in prompts[start : start + batch_size]
                ]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for row, e in enumerate(enc):  # left padding: generation continues at the end
                    ids[row, width - len(e) :] = torch.tensor(e)
                    mask[row, width - len(e) :] = 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=pad,
                    stop_strings=list(stop) or None,
                    tokenizer=tokenizer,
                )
                for row in gen[:, width:].tolist():
                    ended = any(t in eos_ids for t in row)
                    body = [t for t in row if t not in eos_ids and t != pad]
                    text, hit = truncate_at_stop(
                        tokenizer.decode(body, skip_special_tokens=True), list(stop)
                    )
                    out.append((text, hit or ended))
    finally:
        model.train(was_training)
    return out
