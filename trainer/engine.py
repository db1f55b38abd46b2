"""The training loop every step runs (cold start, E-step, M-step, DPO, solver SFT), our own:

- **One optimiser per role, for its life**: an AdamW over the role's trainable parameters, held
  with the model in memory (``RoleModel.optimizer``) and saved in every checkpoint folder beside
  the weights (``optimizer.pt``: the moments; ``trainer_state.json``: the step count that places
  the schedule, the parameter names). A model loaded from a checkpoint takes its optimiser back,
  so a window after a restart (kill -9 included) continues the moments an uninterrupted run
  would have. A window is ``steps_per_window`` optimiser steps (or ``epochs`` passes) over its
  records, several steps on one optimiser, not one step from fresh moments (Adam's first step is
  about ``lr * sign(grad)`` whatever the loss says).
- **The loss where it counts**: the transformer body runs on the whole sequence; the LM head runs
  only on the hidden states of the completion tokens, in chunks of ``chunk_tokens`` rows, each
  chunk recomputed in backward (activation checkpointing) instead of kept: a step's peak holds
  one chunk's logits, never batch x sequence x vocabulary. The same for DPO's log-probs and for
  scoring (``continuation_nll``).
- **Precision**: ``dtype: bfloat16`` runs every training forward under ``torch.autocast`` (the
  HF Trainer's accelerator wrapped only a model's first training); the weights being trained
  stay float32.
- **Data parallel** under ``torchrun``: every rank holds the model and its optimiser, takes its
  share of each global batch, and the gradients are summed across ranks before the step, so
  every rank takes the same step (docs/training.md, "Several GPUs").

The randomness of a window (the order of its records, dropout) is seeded from the trainer's seed,
the role and the role's optimiser step count: a window retried after a crash, or after a
restart, draws what a clean run draws. torch is imported when called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llm.backends.base import continuation_span

if TYPE_CHECKING:
    from trainer.role_models import RoleModel
    from trainer.settings import StepConfig, TrainerSettings

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # not *.safetensors / *.bin: backends load only the weights
STATE_FILE = "trainer_state.json"
DEFAULT_CHUNK_TOKENS = 1024  # trainer.loss_chunk_tokens
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class EngineOptions:
    """How every window trains, from the trainer settings (``EngineOptions.of``)."""

    seed: int = 0
    dtype: str = "float32"  # bfloat16: training forwards under bf16 autocast
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # rows of the LM head at once
    # Recompute each transformer layer's activations in backward instead of keeping them: the
    # body's activations are what a step holds once the head is chunked.
    checkpointing: bool = False

    @classmethod
    def of(cls, settings: TrainerSettings) -> EngineOptions:
        return cls(
            settings.seed,
            settings.dtype,
            settings.loss_chunk_tokens,
            settings.gradient_checkpointing,
        )


# One training at a time in a process: `promptcot up` runs the trainer stages as threads of one
# process, and a window seeds torch's process-wide RNG (dropout) for its steps.
TRAINING_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------
# Encoding: prompt + completion -> token ids and where the completion starts


@dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    first: int  # index of the first completion token; len(ids) when none is left

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.first


def encode(tokenizer: Any, prompt: str, completion: str, max_len: int | None = None) -> Encoded:
    """prompt + completion tokenised together, the completion starting at the first token that
    ends past the prompt (a token straddling the boundary is the completion's, as in the
    backends' score()). Over ``max_len`` the prompt loses its first tokens (the completion is
    what trains), then a completion longer than the budget keeps its start."""
    enc = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    first = max(1, continuation_span([tuple(o) for o in enc["offset_mapping"]], len(prompt)))
    if max_len is not None and len(ids) > max_len:
        cut = max(0, min(len(ids) - max_len, first - 1))
        ids, first = ids[cut:][:max_len], first - cut
    return Encoded(tuple(ids), min(first, len(ids)))


def with_eos(tokenizer: Any, completion: str) -> str:
    """A training target ends its turn: the end-of-turn token after the completion (what TRL
    appended; trainer/role_models.py makes ``eos_token`` the chat's end of turn)."""
    eos = tokenizer.eos_token or ""
    return completion if completion.endswith(eos) else completion + eos


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


# ---------------------------------------------------------------------------------------------
# Log-probs of completions, the head only at the positions that count


def causal_lm(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers are inside it, in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model: Any) -> Any:
    """The device a (peft-wrapped) model's weights are on: inputs go there."""
    return next(model.parameters()).device


def _head_logp(head: Any, softcap: float | None, hidden: Any, targets: Any) -> Any:
    torch = _torch()
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    picked = logits.gather(-1, targets[:, None])[:, 0]
    return picked - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: Any, batch: Sequence[Encoded], *, pad_id: int, chunk: int = DEFAULT_CHUNK_TOKENS
) -> tuple[Any, Any]:
    """(summed log-prob, token count) of each row's completion tokens, as float32 tensors of
    one value a row. Gradients flow when grad mode is on; each chunk of ``chunk`` positions is
    then recomputed in backward rather than kept."""
    torch = _torch()
    from torch.utils.checkpoint import checkpoint

    lm = causal_lm(model)
    body, head = lm.get_decoder(), lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    device = head.weight.device
    rows = len(batch)
    width = max(len(e.ids) for e in batch)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    target = torch.zeros((rows, width), dtype=torch.bool)
    for row, e in enumerate(batch):
        ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[row, : len(e.ids)] = 1
        target[row, e.first : len(e.ids)] = True
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    sel = target[:, 1:]  # position t predicts token t + 1
    states, targets = hidden[:, :-1][sel], ids[:, 1:][sel]
    owner = torch.arange(rows, device=device)[:, None].expand_as(sel)[sel]
    parts = []
    for start in range(0, states.shape[0], chunk):
        piece = (states[start : start + chunk], targets[start : start + chunk])
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logp, head, softcap, *piece, use_reentrant=False))
        else:
            parts.append(_head_logp(head, softcap, *piece))
    logp = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(rows, dtype=torch.float32, device=device).index_add(0, owner, logp)
    return sums, torch.bincount(owner, minlength=rows)


def continuation_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 8,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[float, int]:
    """(summed NLL, token count) of the continuations given their prompts, teacher-forced, in
    the weights' own precision (the same before and after a training)."""
    torch = _torch()
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = [
                    encode(tokenizer, p, c)
                    for p, c in zip(
                        prompts[start : start + batch_size],
                        continuations[start : start + batch_size],
                    )
                ]
                batch = [e for e in batch if e.n_target > 0]
                if not batch:
                    continue
                sums, counts = completion_logps(model, batch, pad_id=pad_id(tokenizer), chunk=chunk)
                total -= float(sums.sum())
                count += int(counts.sum())
    finally:
        model.train(was_training)
    return total, count


# ---------------------------------------------------------------------------------------------
# The role's optimiser, in memory and in the checkpoint folder


class RoleOptimizer:
    """AdamW over a model's trainable parameters, and the role's optimiser step count (the
    schedule's position). ``for_model`` builds it for a model and takes back the state of the
    checkpoint folder the model was loaded from, when its parameters are the same ones."""

    def __init__(self, model: Any, steps: int = 0, windows: int = 0):
        torch = _torch()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model = model
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=0.0, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0
        )
        self.steps = steps
        self.windows = windows

    @classmethod
    def for_model(cls, model: Any, folder: Path | None) -> RoleOptimizer:
        opt = cls(model)
        state_path = folder / STATE_FILE if folder is not None else None
        if state_path is None or not state_path.is_file():
            return opt
        torch = _torch()
        state = json.loads(state_path.read_text())
        opt.steps, opt.windows = int(state.get("optimizer_steps", 0)), int(state.get("windows", 0))
        moments = folder / OPTIMIZER_FILE  # type: ignore[operator]
        if state.get("trainable") != opt.names:
            log.warning(
                "%s: the trainable parameters differ from the ones its optimiser state was saved"
                " for (LoRA switched, or its shape changed): fresh moments",
                folder,
            )
        elif moments.is_file():
            saved = torch.load(moments, map_location="cpu", weights_only=True)
            opt.optimizer.load_state_dict(saved)
        return opt

    def lr(self, cfg: StepConfig) -> float:
        """The step's learning rate at this position: linear warm-up over the role's first
        ``warmup_steps`` optimiser steps, then constant (a stream has no last step to decay
        to)."""
        if cfg.warmup_steps > 0:
            return cfg.lr * min(1.0, (self.steps + 1) / cfg.warmup_steps)
        return cfg.lr

    def save(self, folder: Path, moments: bool = True) -> None:
        torch = _torch()
        if moments:
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        state = {
            "optimizer": "AdamW",
            "betas": list(ADAM_BETAS),
            "eps": ADAM_EPS,
            "optimizer_steps": self.steps,
            "windows": self.windows,
            "moments": moments,
            "trainable": self.names,
        }
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))


def role_optimizer(rm: RoleModel) -> RoleOptimizer:
    """The optimiser of ``rm``'s model: the one in memory, else the one its checkpoint saved."""
    if rm.optimizer is None or rm.optimizer.model is not rm.model:
        rm.optimizer = RoleOptimizer.for_model(rm.model, rm.checkpoint and rm.checkpoint.path)
    return rm.optimizer


def save_train_state(rm: RoleModel, folder: Path, moments: bool = True) -> None:
    """Write ``rm``'s optimiser state into a checkpoint folder being written. A model that was
    not trained since it was loaded carries its checkpoint's state over unchanged."""
    if rm.optimizer is not None and rm.optimizer.model is rm.model:
        rm.optimizer.save(folder, moments)
        return
    if rm.checkpoint is not None:
        for name in (STATE_FILE, OPTIMIZER_FILE) if moments else (STATE_FILE,):
            if (rm.checkpoint.path / name).is_file():
                shutil.copyfile(rm.checkpoint.path / name, folder / name)


# ---------------------------------------------------------------------------------------------
# A window of optimiser steps


class Objective(Protocol):
    """A loss over a window's items: ``units`` is the normaliser of a global batch (its tokens,
    or its pairs), ``loss`` the summed, unnormalised loss of a micro-batch of it."""

    def __len__(self) -> int: ...

    def units(self, items: Sequence[int]) -> float: ...

    def loss(self, model: Any, items: Sequence[int]) -> Any: ...


@dataclass
class WindowLosses:
    """The training loss of each optimiser step of a window, and the role's step count after."""

    losses: list[float] = field(default_factory=list)
    optimizer_step: int = 0

    @property
    def mean(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def metrics(self) -> dict[str, float]:
        return {
            "train_loss": self.mean,
            "train_loss_first": self.losses[0] if self.losses else float("nan"),
            "train_loss_last": self.losses[-1] if self.losses else float("nan"),
            "optimizer_steps": float(len(self.losses)),
            "optimizer_step": float(self.optimizer_step),
        }


def window_steps(cfg: StepConfig, n_items: int) -> int:
    """Optimiser steps of a window of ``n_items``: ``steps_per_window`` when set, else
    ``epochs`` passes of batches of ``batch_size`` (at least one step)."""
    if n_items <= 0:
        return 0
    if cfg.steps_per_window:
        return cfg.steps_per_window
    return max(1, math.ceil(cfg.epochs * n_items / max(1, min(cfg.batch_size, n_items))))


def _order(n: int, seed: int) -> Iterator[int]:
    """Item indices, a fresh permutation every pass (deterministic from ``seed``)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


def window_seed(seed: int, role: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}/{role}/{step}".encode()).hexdigest()
    return int(digest[:15], 16)


StepReport = Callable[[int, int], None]  # (optimiser steps done, steps in the window)


def train_steps(
    rm: RoleModel,
    objective: Objective,
    cfg: StepConfig,
    options: EngineOptions | None = None,
    on_step: StepReport | None = None,
) -> WindowLosses:
    """The window's optimiser steps on ``rm`` with its role's optimiser; the model is left in
    eval mode. ``on_step`` hears of each step (the cold start's progress bar)."""
    with TRAINING_LOCK:
        return _train_steps(rm, objective, cfg, options or EngineOptions(), on_step)


def _train_steps(
    rm: RoleModel,
    objective: Objective,
    cfg: StepConfig,
    options: EngineOptions,
    on_step: StepReport | None,
) -> WindowLosses:
    torch = _torch()
    seed, dtype = options.seed, options.dtype
    opt = role_optimizer(rm)
    n_steps = window_steps(cfg, len(objective))
    device = model_device(rm.model)
    rank, world = data_parallel(device)
    batch = min(cfg.batch_size, len(objective))
    micro = max(1, cfg.per_device_batch_size)
    mixed = window_seed(seed, rm.role, opt.steps)
    order = _order(len(objective), mixed)
    out = WindowLosses()
    lm = causal_lm(rm.model)
    if options.checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rm.model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(mixed)
            if on_step is not None:
                on_step(0, n_steps)
            for done in range(n_steps):
                items = [next(order) for _ in range(batch)]
                units = objective.units(items)
                mine = items[rank::world]
                total = torch.zeros((), device=device)
                for start in range(0, len(mine), micro):
                    with autocast(device, dtype):
                        loss = objective.loss(rm.model, mine[start : start + micro]) / units
                    loss.backward()
                    total += loss.detach().float()
                if world > 1:
                    _sum_across_ranks(opt.params, total)
                if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(opt.params, cfg.max_grad_norm)
                for group in opt.optimizer.param_groups:
                    group["lr"], group["weight_decay"] = opt.lr(cfg), cfg.weight_decay
                opt.optimizer.step()
                opt.optimizer.zero_grad(set_to_none=True)
                opt.steps += 1
                out.losses.append(float(total))
                if on_step is not None:
                    on_step(done + 1, n_steps)
        opt.windows += 1
    finally:
        opt.optimizer.zero_grad(set_to_none=True)
        rm.model.eval()
        if options.checkpointing:
            lm.gradient_checkpointing_disable()
    out.optimizer_step = opt.steps
    log.info("training %s: %s", rm.role, out.metrics())
    return out


def autocast(device: Any, dtype: str) -> Any:
    """bf16 autocast on ``device`` when ``dtype`` says so (a no-op context otherwise)."""
    torch = _torch()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# ---------------------------------------------------------------------------------------------
# Data parallel


def data_parallel(device: Any) -> tuple[int, int]:
    """(rank, world size): under torchrun (``WORLD_SIZE`` > 1) the process group is joined on
    first use (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            _torch().cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _sum_across_ranks(params: list[Any], total: Any) -> None:
    """Sum the gradients (each rank's share of the global batch's normalised loss) and the
    logged loss across ranks, in one flat buffer."""
    import torch.distributed as dist

    torch = _torch()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [total.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n
    total.copy_(flat[-1])


def _torch():
    import torch

    return torch
