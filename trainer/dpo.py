"""Self-play DPO of the solver on windows of preference pairs (chosen = a passing rollout,
rejected = a failing one), on the training engine (trainer/engine.py): several optimiser steps a
window on the solver's one optimiser, against a pinned reference (trainer/anchor.py), so the loss
moves off ln 2 within a window and β matters. The sigmoid loss on summed completion log-probs
(the TRL/paper form), plus an optional SFT term on the chosen answers (``dpo.sft_weight``).
The reference log-probs are computed once a window, without grad, before its first step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from llm.roles import Role
from streams.records import PreferencePair
from trainer.anchor import AnchorModels, resolve
from trainer.engine import (
    Encoded,
    EngineOptions,
    WindowLosses,
    autocast,
    completion_logps,
    continuation_nll,
    encode,
    model_device,
    pad_id,
    train_steps,
    with_eos,
)
from trainer.role_models import RoleModel
from trainer.settings import DPOConfig, TrainerSettings
from trainer.solver import SolverWindows, eval_backend_settings, solver_prompt

log = logging.getLogger(__name__)

__all__ = ["DPOTrainerLoop", "dpo_rows", "dpo_train", "eval_backend_settings"]


def dpo_prompt(tokenizer: Any, pair: PreferencePair) -> str:
    """The pair's prompt as the solver saw it (trainer/solver.py, ``solver_prompt``)."""
    return solver_prompt(tokenizer, pair.domain, pair.prompt)


def usable(pair: PreferencePair) -> bool:
    """A pair DPO can learn from: both answers non-empty and different."""
    return bool(pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected)


def dpo_row(tokenizer: Any, pair: PreferencePair) -> dict[str, str]:
    return {"prompt": dpo_prompt(tokenizer, pair), "chosen": pair.chosen, "rejected": pair.rejected}


def dpo_rows(tokenizer: Any, pairs: Sequence[PreferencePair]) -> list[dict[str, str]]:
    """The rows of the usable pairs (the others are dropped)."""
    return [dpo_row(tokenizer, p) for p in pairs if usable(p)]


def preference_margin(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]]) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt) under ``model``:
    what DPO should push up (measured on held-out pairs, it says whether it generalises)."""
    margins = []
    for row in rows:
        nll_c, _ = continuation_nll(model, tokenizer, [row["prompt"]], [row["chosen"]])
        nll_r, _ = continuation_nll(model, tokenizer, [row["prompt"]], [row["rejected"]])
        margins.append(nll_r - nll_c)
    return sum(margins) / len(margins) if margins else float("nan")


# ---------------------------------------------------------------------------------------------
# The loss


class PairsEncoded:
    """Each row's chosen and rejected sequences (each answer ending its turn), the pairs whose
    answers both kept a token within ``max_seq_len``."""

    def __init__(self, tokenizer: Any, rows: Sequence[dict[str, str]], max_len: int):
        self.chosen: list[Encoded] = []
        self.rejected: list[Encoded] = []
        for row in rows:
            c = encode(tokenizer, row["prompt"], with_eos(tokenizer, row["chosen"]), max_len)
            r = encode(tokenizer, row["prompt"], with_eos(tokenizer, row["rejected"]), max_len)
            if c.n_target and r.n_target:
                self.chosen.append(c)
                self.rejected.append(r)

    def __len__(self) -> int:
        return len(self.chosen)

    def logps(self, model: Any, items: Sequence[int], pad: int, chunk: int) -> tuple[Any, ...]:
        """(chosen log-probs, rejected log-probs, chosen token counts), one forward for both."""
        batch = [self.chosen[i] for i in items] + [self.rejected[i] for i in items]
        sums, counts = completion_logps(model, batch, pad_id=pad, chunk=chunk)
        n = len(items)
        return sums[:n], sums[n:], counts[:n]


class DPOObjective:
    """Mean over a global batch's pairs of -log σ(β((π_c - ref_c) - (π_r - ref_r))), plus
    ``sft_weight`` x the chosen answer's mean NLL per token."""

    def __init__(
        self, pairs: PairsEncoded, reference: tuple[Any, Any], cfg: DPOConfig, pad: int, chunk: int
    ):
        self.pairs, self.ref_chosen, self.ref_rejected = pairs, *reference
        self.beta, self.sft_weight = cfg.beta, cfg.sft_weight
        self.pad, self.chunk = pad, chunk

    def __len__(self) -> int:
        return len(self.pairs)

    def units(self, items: Sequence[int]) -> float:
        return float(len(items))

    def loss(self, model: Any, items: Sequence[int]) -> Any:
        import torch
        import torch.nn.functional as F

        chosen, rejected, n_chosen = self.pairs.logps(model, items, self.pad, self.chunk)
        index = torch.tensor(list(items))
        ref_c = self.ref_chosen[index].to(chosen.device)
        ref_r = self.ref_rejected[index].to(chosen.device)
        logits = self.beta * ((chosen - ref_c) - (rejected - ref_r))
        loss = -F.logsigmoid(logits).sum()
        if self.sft_weight:
            loss = loss + self.sft_weight * (-chosen / n_chosen.clamp(min=1)).sum()
        return loss


def reference_logps(
    model: Any, pairs: PairsEncoded, pad: int, chunk: int, batch: int, dtype: str
) -> tuple:
    """The reference's (chosen, rejected) log-probs of every pair, on the cpu, without grad, in
    the precision the policy's are computed in while it trains."""
    import torch

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        with torch.no_grad(), autocast(model_device(model), dtype):
            for start in range(0, len(pairs), batch):
                items = list(range(start, min(start + batch, len(pairs))))
                c, r, _ = pairs.logps(model, items, pad, chunk)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def dpo_train(
    rm: RoleModel,
    rows: list[dict[str, str]],
    settings: TrainerSettings,
    anchor: Any = None,
    anchors: AnchorModels | None = None,
) -> WindowLosses:
    """A window of DPO steps on ``rows`` in place, against ``anchor`` (None: the policy as it is
    before the window)."""
    cfg, tok, options = settings.dpo, rm.tokenizer, EngineOptions.of(settings)
    pad, chunk = pad_id(tok), options.chunk_tokens
    pairs = PairsEncoded(tok, rows, cfg.max_seq_len)
    if not len(pairs):
        return WindowLosses()

    def logps(model: Any) -> tuple:
        return reference_logps(model, pairs, pad, chunk, cfg.per_device_batch_size, settings.dtype)

    if anchor is None:
        reference = logps(rm.model)
    else:
        holder = anchors or AnchorModels(settings.dtype, settings.device)
        reference = holder.logps(rm, anchor, logps)
    objective = DPOObjective(pairs, reference, cfg, pad, chunk)
    return train_steps(rm, objective, cfg, options)


# ---------------------------------------------------------------------------------------------
# The windows


class DPOTrainerLoop(SolverWindows[PreferencePair]):
    """DPO windows of the solver. Pairs of held-out problems (by a hash of the problem id) are
    never trained on: the margin on them, before and after each update, is the DPO signal."""

    step = "dpo"
    noun = "pair"
    heldout_file = "heldout-pairs.jsonl"

    def __init__(self, settings: TrainerSettings, base_path: str):
        super().__init__(settings, base_path)
        self.anchors = AnchorModels(settings.dtype, settings.device)

    @property
    def cfg(self) -> DPOConfig:
        return self.settings.dpo

    def usable(self, record: PreferencePair) -> bool:
        return usable(record)

    def row(self, tokenizer: Any, record: PreferencePair) -> dict[str, str]:
        return dpo_row(tokenizer, record)

    def train(self, rm: RoleModel, rows: list[dict[str, str]]) -> tuple[dict[str, Any], dict]:
        anchor = resolve(rm.checkpoint, Role.SOLVER, rm.base_path, self.cfg.anchor_refresh_windows)
        signal, label = self.signal_rows(rows)
        before = preference_margin(rm.model, rm.tokenizer, signal)
        losses = dpo_train(rm, rows, self.settings, anchor, self.anchors)
        after = preference_margin(rm.model, rm.tokenizer, signal)
        metrics = {
            **losses.metrics(),
            "n_pairs": len(rows),
            f"n_{label}_pairs": len(signal),
            f"{label}_margin_before": before,
            f"{label}_margin_after": after,
            "anchor_windows": anchor.windows + 1,
        }
        log.info(
            "DPO window: %d pairs against %s, loss %.4f -> %.4f, %s margin %.3f -> %.3f",
            len(rows),
            anchor.version,
            metrics["train_loss_first"],
            metrics["train_loss_last"],
            label,
            before,
            after,
        )
        return metrics, anchor.manifest()
