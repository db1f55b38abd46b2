"""The trainer: cold start and the EM loop for p_θ / q_φ, DPO of the solver, versioned
checkpoints, evaluation, and the stages that run them on windows of the rationales and pairs
topics (docs/training.md).

torch/transformers/trl are imported only when a model is loaded or trained.
"""

from trainer.checkpoints import Checkpoint, CheckpointStore, TrainedLedger
from trainer.role_models import RoleModel
from trainer.settings import (
    ColdStartConfig,
    DPOConfig,
    EStepConfig,
    EvalConfig,
    LoraConfig,
    MStepConfig,
    StepConfig,
    TrainerSettings,
    WindowConfig,
)

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "ColdStartConfig",
    "DPOConfig",
    "EStepConfig",
    "EvalConfig",
    "LoraConfig",
    "MStepConfig",
    "RoleModel",
    "StepConfig",
    "TrainedLedger",
    "TrainerSettings",
    "WindowConfig",
]
