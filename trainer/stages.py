"""The trainer as stages: windows of rationales -> E-step + M-step -> model updates (and the
window's seeds sent round again for the next epoch); windows of preference pairs -> DPO -> a
solver update; windows of verified traces -> SFT -> a solver update (DPO and SFT train one solver
lineage: trainer/solver.py). Every process serving a role follows the updates
(workers/reload.py).

Windows are the runtime's micro-batches; these stages get long ones (``settings.stages``, sized
by the trainer profile), or a trickle of records would arrive in windows too small to train on.
A window under ``min_records`` trains nothing (its seeds still go round again; the rule is the
trainer's: trainer/em.py, trainer/solver.py). ``process`` is
idempotent: a window redelivered after a crash trains only what it had not finished and announces
every version it produced (trainer/em.py). A training error raises: the runtime retries the
window, and dead-letters it if it keeps failing. Models load on first use, in the worker thread,
and torch is imported only then.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from llm.roles import Role, model_path_for
from streams.records import ModelUpdate, PreferencePair, Rationale, SolverTrace
from streams.topics import MODELS, PAIRS, RATIONALES, SEEDS_ANNOTATED, TRACES
from trainer.coldstart import ColdStartData, cold_start, on_first_start
from trainer.settings import TrainerSettings
from workers.stage import Emit, Stage

log = logging.getLogger(__name__)
In = TypeVar("In", PreferencePair, Rationale, SolverTrace)


class _TrainerStage(Stage[In]):
    journaled = False  # trained-on ids live in the checkpoints (trainer/checkpoints.py)
    isolate_failures = False  # a window is one unit: retried whole, then dead-lettered whole
    outputs: tuple = (MODELS,)

    @property
    def trainer_cfg(self) -> TrainerSettings:
        return self.settings.trainer

    def _emit_updates(self, updates: list[ModelUpdate]) -> list[Emit]:
        return [self.emit(MODELS, u) for u in updates]


class EStepStage(_TrainerStage[Rationale]):
    """rationales -> models (+ seeds.annotated): on first start the cold start, then per window
    the best-of-K E-step on q_φ and the M-step on p_θ; every seed of the window goes round again
    one epoch on."""

    name = "em"
    input = RATIONALES
    outputs = (MODELS, SEEDS_ANNOTATED)

    def setup(self) -> None:
        from trainer.em import EMTrainer

        self.trainer = EMTrainer.on_models(self.trainer_cfg, self.settings.models)

    def start(self) -> list[Emit]:
        """The paper's cold start, when p_θ or q_φ has no checkpoint yet: SFT of both on the
        annotated seeds, before any EM window trains (the trainer holds windows meanwhile)."""
        if not on_first_start(self.trainer_cfg):
            return []
        self.ensure_ready()
        try:
            done = cold_start(self.settings, self.trainer, annotated=_log_annotated)
        except Exception:  # noqa: BLE001  (the loop still runs, from the base models)
            log.exception("em: the cold start failed; EM starts from the base models")
            return []
        return self._emit_updates(done.updates) if done is not None else []

    def process(self, records: list[Rationale]) -> list[Emit]:
        cfg = self.trainer_cfg
        if not cfg.enabled or not (cfg.e_step.enabled or cfg.m_step.enabled):
            log.info("em: trainer disabled, %d rationales not trained on", len(records))
            return []
        self.ensure_ready()
        result = self.trainer.run_window(records)
        if result.skipped:
            log.info("em: %s", result.skipped)
        return self._emit_updates(result.updates) + [
            self.emit(SEEDS_ANNOTATED, s) for s in result.next_epoch
        ]


def _log_annotated(data: ColdStartData) -> None:
    log.info(
        "em: cold start on %d annotated seeds (%.0f%% of the seeds annotated; %s)"
        " and %d held-out seeds further on",
        len(data.seeds),
        100 * data.success_rate,
        dict(data.rejected) or "none rejected",
        len(data.heldout),
    )


class _SolverStage(_TrainerStage[In]):
    """A window of records that trains the solver (trainer/solver.py)."""

    step = ""

    def enabled(self) -> bool:
        return self.trainer_cfg.enabled and getattr(self.trainer_cfg, self.step).enabled

    def process(self, records: list[In]) -> list[Emit]:
        if not self.enabled():
            log.info("%s: trainer disabled, %d records not trained on", self.name, len(records))
            return []
        self.ensure_ready()
        # min_records is counted by the trainer on the fresh records (trainer/solver.py): a
        # window redelivered after a crash re-announces its versions whatever its size.
        result = self.trainer.run_window(records)
        if result.skipped:
            log.info("%s: %s", self.name, result.skipped)
        return self._emit_updates(result.updates)


class DPOStage(_SolverStage[PreferencePair]):
    """pairs -> models: DPO of the solver per window."""

    name = "dpo"
    input = PAIRS
    step = "dpo"

    def setup(self) -> None:
        from trainer.dpo import DPOTrainerLoop

        self.trainer = DPOTrainerLoop(
            self.trainer_cfg, model_path_for(self.settings.models, Role.SOLVER)
        )


class SolverSFTStage(_SolverStage[SolverTrace]):
    """traces -> models: SFT of the solver per window, on the lineage DPO trains too."""

    name = "sft"
    input = TRACES
    step = "sft"

    def setup(self) -> None:
        from trainer.traces import SolverSFTLoop

        self.trainer = SolverSFTLoop(
            self.trainer_cfg, model_path_for(self.settings.models, Role.SOLVER)
        )
