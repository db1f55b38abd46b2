"""The trainer: cold start and the EM loop for p_θ / q_φ, DPO and SFT of the solver, the
training engine they run on, versioned checkpoints, evaluation, and the stages that run them on
windows of the rationales, pairs and traces topics (docs/training.md).

torch/transformers/peft are imported only when a model is loaded or trained.
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
    SolverSFTConfig,
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
    "SolverSFTConfig",
    "StepConfig",
    "TrainedLedger",
    "TrainerSettings",
    "WindowConfig",
]
