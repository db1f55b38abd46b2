"""The solver's trainers share one lineage (trainer/lineage.py): DPO on preference pairs
(trainer/dpo.py) and SFT on verified traces (trainer/traces.py) train the same model, each
window under the role's lock, on the role's newest checkpoint, with its one optimiser.

What both windows share lives here (``SolverWindows``): the solver's prompt as generation renders
it, records of held-out problems (by a hash of the problem id) kept for the signal and never
trained on, and the window rule: a redelivered window announces the versions that trained on its
records before, trains the usable records not trained on yet, and trains nothing when those are
fewer than ``window.min_records`` (unless part of it was trained before: the records that refilled
a redelivered window would otherwise be committed untrained).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from llm.backends.base import BackendSettings
from llm.prompts import SOLVER_BY_DOMAIN, SOLVER_MATH, render_chat
from llm.roles import Role
from streams import memory
from streams.records import ModelUpdate
from trainer.checkpoints import CheckpointStore, TrainedLedger
from trainer.heldout import HeldoutPool, is_heldout
from trainer.lineage import role_lineage
from trainer.role_models import RoleModel, load_role_model, save_role_model, training_device
from trainer.settings import DPOConfig, SolverSFTConfig, TrainerSettings
from trainer.updates import WindowResult, model_update, update_from_manifest

log = logging.getLogger(__name__)


class SolverRecord(Protocol):
    id: str
    problem_id: str


R = TypeVar("R", bound=SolverRecord)


def solver_prompt(tokenizer: Any, domain: str, prompt: str) -> str:
    """A solver prompt as the solver saw it. A prompt that is already a rendered chat (it
    carries the chat markup) is used as is; a bare problem/user text is rendered with the
    solver template of its domain, so training sees what generation sees."""
    if "<|im_start|>" in prompt or (getattr(tokenizer, "bos_token", None) or "\0") in prompt:
        return prompt
    template = SOLVER_BY_DOMAIN.get(domain, SOLVER_MATH)
    return render_chat(tokenizer, template.system, prompt, template.assistant_prefix)


def eval_backend_settings(settings: TrainerSettings) -> BackendSettings:
    """The backend that scores a new solver version: on the device and in the dtype the trainer
    trains with (the backend's own default is cpu, float32)."""
    return BackendSettings(device=training_device(settings.device), dtype=settings.dtype)


class SolverWindows(Generic[R]):
    """Windows of records that train the solver. A subclass names its ``step`` and held-out
    file and says what a usable record is, its training row, and how a window trains and is
    measured (``train``)."""

    step: str = ""
    noun: str = ""  # what a record is, in log lines: "pair", "trace"
    heldout_file: str = ""

    def __init__(self, settings: TrainerSettings, base_path: str):
        self.settings = settings
        self.base_path = base_path
        self.store = CheckpointStore(settings.checkpoint_dir, settings.keep_last)
        self.lineage = role_lineage(self.store, Role.SOLVER)
        self.ledger = TrainedLedger.load(self.store, [Role.SOLVER])
        self.heldout = HeldoutPool(settings.checkpoint_dir / self.heldout_file)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

    # -- what a subclass says ---------------------------------------------------------------

    @property
    def cfg(self) -> DPOConfig | SolverSFTConfig:
        raise NotImplementedError

    def usable(self, record: R) -> bool:
        raise NotImplementedError

    def row(self, tokenizer: Any, record: R) -> dict[str, str]:
        raise NotImplementedError

    def train(self, rm: RoleModel, rows: list[dict[str, str]]) -> tuple[dict[str, Any], dict]:
        """Train on ``rows`` (the signal measured before and after); returns the update's
        metrics and the keys to add to the checkpoint's manifest."""
        raise NotImplementedError

    # -- the window ---------------------------------------------------------------------------

    @property
    def solver(self) -> RoleModel:
        """The solver in this process, on its newest checkpoint."""
        cfg = self.cfg
        return self.lineage.model(
            lambda: load_role_model(
                self.store,
                Role.SOLVER,
                self.base_path,
                use_lora=cfg.use_lora,
                lora=cfg.lora,
                dtype=self.settings.dtype,
                device=self.settings.device,
            )
        )

    def run_window(self, records: Sequence[R]) -> WindowResult:
        with self.lineage.training():
            try:
                return self._run_window(list(records))
            except BaseException:
                self.lineage.discard()  # may hold an update no checkpoint has
                raise
            finally:
                memory.release()  # what the window freed goes back to the system

    def _run_window(self, records: list[R]) -> WindowResult:
        s, cfg = self.settings, self.cfg
        rm = self.solver
        held = [r for r in records if is_heldout(r.problem_id, s.heldout_fraction)]
        self.heldout.add((r.id, self.row(rm.tokenizer, r)) for r in held if self.usable(r))
        done = [r.id for r in records if self.ledger.get(Role.SOLVER, r.id) is not None]
        found = (update_from_manifest(m) for m in self.ledger.manifests_for(Role.SOLVER, done))
        again: list[ModelUpdate] = [u for u in found if u is not None]
        fresh = [
            r
            for r in records
            if self.usable(r)
            and r.id not in done
            and not is_heldout(r.problem_id, s.heldout_fraction)
        ]
        noun = self.noun
        if not fresh:
            return WindowResult(again, f"no {noun} to train on (held out, unusable or trained on)")
        if len(fresh) < cfg.window.min_records and not done:
            reason = f"{len(fresh)} usable fresh {noun}s < min_records {cfg.window.min_records}"
            return WindowResult(again, reason)
        rows = [self.row(rm.tokenizer, r) for r in fresh]
        metrics, manifest = self.train(rm, rows)
        parents = [r.id for r in fresh][:256]
        ckpt = save_role_model(
            self.store,
            rm,
            self.step,
            metrics,
            [r.id for r in fresh],
            parents,
            manifest=manifest,
            save_optimizer=s.save_optimizer,
        )
        self.ledger.add(Role.SOLVER, {**ckpt.metadata, "path": str(ckpt.path)})
        if s.eval.after_dpo:
            from trainer.evaluate import evaluate_path

            backend = eval_backend_settings(s)
            result = evaluate_path(str(ckpt.path), s.eval, role=Role.SOLVER, backend=backend)
            if result.accuracy is not None:
                metrics[f"eval_{s.eval.benchmark}_accuracy"] = result.accuracy
            if result.gold_nll_per_token is not None:
                metrics[f"eval_{s.eval.benchmark}_gold_nll"] = result.gold_nll_per_token
        update = model_update(rm, self.step, metrics, parents)
        return WindowResult([*again, update], metrics=metrics)

    def signal_rows(self, rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
        """The held-out pool's rows (or, until it has some, the window's own) and their label."""
        pool = self.heldout.items()
        return (pool, "heldout") if pool else (rows, "train")
