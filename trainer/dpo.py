"""Self-play DPO of the solver on windows of preference pairs (chosen = a passing rollout,
rejected = a failing one), with TRL's DPOTrainer.

The reference model is the policy as it was at the start of the window: TRL precomputes the
reference log-probs with the policy before the first step (``precompute_ref_log_probs``), so no
second copy of the model sits in memory. Window after window this is iterative DPO, each round
anchored to the previous round's weights. With LoRA TRL copies the adapter as the reference
(``drop_reference_adapter`` removes the copy once the window is trained).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from llm.backends.base import BackendSettings
from llm.prompts import SOLVER_BY_DOMAIN, SOLVER_MATH, render_chat
from llm.roles import Role
from streams import memory
from streams.records import PreferencePair
from trainer.checkpoints import CheckpointStore, TrainedLedger
from trainer.heldout import HeldoutPool, is_heldout
from trainer.role_models import RoleModel, load_role_model, save_role_model, training_device
from trainer.settings import TrainerSettings
from trainer.sft import TRAINING_LOCK, common_training_args, continuation_nll, quiet_datasets
from trainer.updates import WindowResult, model_update, update_from_manifest

log = logging.getLogger(__name__)


def dpo_prompt(tokenizer: Any, pair: PreferencePair) -> str:
    """The pair's prompt as the solver saw it. A prompt that is already a rendered chat (it
    carries the chat markup) is used as is; a bare problem/user text is rendered with the
    solver template of its domain, so training sees what generation sees."""
    prompt = pair.prompt
    if "<|im_start|>" in prompt or (getattr(tokenizer, "bos_token", None) or "\0") in prompt:
        return prompt
    template = SOLVER_BY_DOMAIN.get(pair.domain, SOLVER_MATH)
    return render_chat(tokenizer, template.system, prompt, template.assistant_prefix)


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


REFERENCE_ADAPTER = "ref"  # the name TRL's DPOTrainer gives its copy of a LoRA policy


def dpo_train(rm: RoleModel, rows: list[dict[str, str]], settings: TrainerSettings) -> float:
    """DPO on ``rows`` in place; returns the mean training loss."""
    with TRAINING_LOCK:
        return _dpo_train(rm, rows, settings)


def _dpo_train(rm: RoleModel, rows: list[dict[str, str]], settings: TrainerSettings) -> float:
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    cfg = settings.dpo
    quiet_datasets()
    with tempfile.TemporaryDirectory(prefix="promptcot-dpo-") as out:
        args = TRLDPOConfig(
            **common_training_args(
                cfg, len(rows), settings.seed, out, model=rm.model, dtype=settings.dtype
            ),
            beta=cfg.beta,
            max_length=cfg.max_seq_len,
            precompute_ref_log_probs=True,
            dataset_num_proc=None,
        )
        try:
            trainer = DPOTrainer(
                model=rm.model,
                args=args,
                train_dataset=Dataset.from_list(rows),
                processing_class=rm.tokenizer,
            )
            result = trainer.train()
        finally:
            drop_reference_adapter(rm.model)
    rm.model.eval()
    return float(result.training_loss)


def drop_reference_adapter(model: Any) -> None:
    """Remove the frozen copy of the adapter TRL adds to a LoRA policy as its reference: left
    in place, the next window's DPOTrainer cannot add its own (it refuses an existing name)
    and every checkpoint saves the stale copy beside the adapter."""
    if REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {}):
        model.set_adapter("default")
        model.delete_adapter(REFERENCE_ADAPTER)


def eval_backend_settings(settings: TrainerSettings) -> BackendSettings:
    """The backend that scores a new solver version: on the device and in the dtype the trainer
    trains with (the backend's own default is cpu, float32)."""
    return BackendSettings(device=training_device(settings.device), dtype=settings.dtype)


class DPOTrainerLoop:
    """The solver in memory between windows, resumed from its newest checkpoint. Pairs of
    held-out problems (by a hash of the problem id) are never trained on: the margin on them,
    before and after each update, is the DPO signal."""

    def __init__(self, settings: TrainerSettings, base_path: str):
        self.settings = settings
        self.base_path = base_path
        self.store = CheckpointStore(settings.checkpoint_dir, settings.keep_last)
        self._rm: RoleModel | None = None
        self.ledger = TrainedLedger.load(self.store, [Role.SOLVER])
        self.heldout = HeldoutPool(settings.checkpoint_dir / "heldout-pairs.jsonl")
        self._lock = threading.Lock()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        memory.hold(self)

    def memory_components(self) -> list[tuple[str, Any]]:
        """The solver held between windows (with its reference adapter during one), for the
        memory account (streams/memory.py)."""
        rm = self._rm
        return [] if rm is None else [(f"trainer {Role.SOLVER}", rm.model)]

    @property
    def solver(self) -> RoleModel:
        if self._rm is None:
            cfg = self.settings.dpo
            self._rm = load_role_model(
                self.store,
                Role.SOLVER,
                self.base_path,
                use_lora=cfg.use_lora,
                lora=cfg.lora,
                dtype=self.settings.dtype,
                device=self.settings.device,
            )
        return self._rm

    def run_window(self, pairs: Sequence[PreferencePair]) -> WindowResult:
        with self._lock:
            try:
                return self._run_window(list(pairs))
            except BaseException:
                self._rm = None  # may hold an update no checkpoint has: retry from the newest
                raise
            finally:
                memory.release()  # what the window freed goes back to the system

    def _run_window(self, pairs: list[PreferencePair]) -> WindowResult:
        """Held-out pairs join the pool; the versions that trained on part of this window
        before (a window redelivered after a crash, maybe refilled with later pairs) are
        announced again; the usable pairs not trained on yet are trained. ``min_records``
        counts those fresh pairs: under it a window trains nothing, unless part of it was
        trained before (its first delivery was big enough; the pairs that refilled it would
        otherwise be committed untrained), as the EM trainer trains the rest of a window."""
        s = self.settings
        rm = self.solver
        held = [p for p in pairs if is_heldout(p.problem_id, s.heldout_fraction)]
        self.heldout.add((p.id, dpo_row(rm.tokenizer, p)) for p in held if usable(p))
        done = [p.id for p in pairs if self.ledger.get(Role.SOLVER, p.id) is not None]
        found = (update_from_manifest(m) for m in self.ledger.manifests_for(Role.SOLVER, done))
        again = [u for u in found if u is not None]
        fresh = [
            p
            for p in pairs
            if usable(p) and p.id not in done and not is_heldout(p.problem_id, s.heldout_fraction)
        ]
        if not fresh:
            return WindowResult(again, "no pair to train on (held out, unusable or trained on)")
        if len(fresh) < s.dpo.window.min_records and not done:
            return WindowResult(
                again, f"{len(fresh)} usable fresh pairs < min_records {s.dpo.window.min_records}"
            )
        rows = [dpo_row(rm.tokenizer, p) for p in fresh]
        signal = self.heldout.items()
        label = "heldout" if signal else "train"
        signal = signal or rows
        before = preference_margin(rm.model, rm.tokenizer, signal)
        loss = dpo_train(rm, rows, s)
        after = preference_margin(rm.model, rm.tokenizer, signal)
        metrics = {
            "train_loss": loss,
            "n_pairs": len(rows),
            f"n_{label}_pairs": len(signal),
            f"{label}_margin_before": before,
            f"{label}_margin_after": after,
        }
        parents = [p.id for p in fresh][:256]
        ckpt = save_role_model(self.store, rm, "dpo", metrics, [p.id for p in fresh], parents)
        self.ledger.add(Role.SOLVER, {**ckpt.metadata, "path": str(ckpt.path)})
        if s.eval.after_dpo:
            from trainer.evaluate import evaluate_path

            backend = eval_backend_settings(s)
            result = evaluate_path(str(ckpt.path), s.eval, role=Role.SOLVER, backend=backend)
            metrics[f"eval_{s.eval.benchmark}_accuracy"] = result.accuracy
        log.info("DPO window: %d pairs, %s margin %.3f -> %.3f", len(rows), label, before, after)
        return WindowResult([*again, model_update(rm, "dpo", metrics, parents)], metrics=metrics)
