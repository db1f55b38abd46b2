"""The trainer as stages: windows of rationales -> E-step + M-step -> model updates; windows of
preference pairs -> DPO -> a solver update. Every process serving a role follows the updates
(workers/reload.py).

Windows are the runtime's micro-batches; these stages get long ones (``settings.stages``), or a
trickle of records would arrive in windows too small to train on. A window under
``min_records`` is skipped with a log line. Models load on first use, in the worker thread, and
torch is imported only then.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from streams.records import ModelUpdate, PreferencePair, Rationale
from streams.topics import MODELS, PAIRS, RATIONALES
from trainer.config import TrainerSettings
from workers.roles import Role, model_path_for
from workers.stage import Emit, Stage

log = logging.getLogger(__name__)
In = TypeVar("In", PreferencePair, Rationale)


class _TrainerStage(Stage[In]):
    journaled = False  # trained-on ids live in the checkpoints (trainer/checkpoints.py)
    isolate_failures = False  # a window is one unit: retried whole, then dead-lettered whole
    outputs = (MODELS,)

    @property
    def trainer_cfg(self) -> TrainerSettings:
        return self.settings.trainer

    def _emit_updates(self, updates: list[ModelUpdate]) -> list[Emit]:
        return [self.emit(MODELS, u) for u in updates]


class EStepStage(_TrainerStage[Rationale]):
    """rationales -> models: best-of-K E-step on q_φ, then the M-step on p_θ, per window."""

    name = "em"
    input = RATIONALES

    def setup(self) -> None:
        from trainer.em import EMTrainer

        self.trainer = EMTrainer(
            self.trainer_cfg,
            {
                role: model_path_for(self.settings.models, role)
                for role in (Role.PROMPT_MODEL, Role.RATIONALE_MODEL)
            },
        )

    def process(self, records: list[Rationale]) -> list[Emit]:
        cfg = self.trainer_cfg
        rationales = records
        if not cfg.enabled or not (cfg.e_step.enabled or cfg.m_step.enabled):
            log.info("em: trainer disabled, %d rationales not trained on", len(rationales))
            return []
        if len(rationales) < cfg.e_step.window.min_records:
            log.info(
                "em: window of %d rationales < min_records %d, skipped",
                len(rationales),
                cfg.e_step.window.min_records,
            )
            return []
        self.ensure_ready()
        result = self.trainer.run_window(rationales)
        if result.skipped:
            log.info("em: window skipped: %s", result.skipped)
        return self._emit_updates(result.updates)


class DPOStage(_TrainerStage[PreferencePair]):
    """pairs -> models: DPO of the solver per window."""

    name = "dpo"
    input = PAIRS

    def setup(self) -> None:
        from trainer.dpo import DPOTrainerLoop

        self.trainer = DPOTrainerLoop(
            self.trainer_cfg, model_path_for(self.settings.models, Role.SOLVER)
        )

    def process(self, records: list[PreferencePair]) -> list[Emit]:
        cfg = self.trainer_cfg
        pairs = records
        if not cfg.enabled or not cfg.dpo.enabled:
            log.info("dpo: trainer disabled, %d pairs not trained on", len(pairs))
            return []
        if len(pairs) < cfg.dpo.window.min_records:
            log.info(
                "dpo: window of %d pairs < min_records %d, skipped",
                len(pairs),
                cfg.dpo.window.min_records,
            )
            return []
        self.ensure_ready()
        result = self.trainer.run_window(pairs)
        if result.skipped:
            log.info("dpo: window skipped: %s", result.skipped)
        return self._emit_updates(result.updates)
