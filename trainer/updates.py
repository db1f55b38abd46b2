"""What a training window produces: the model updates it announces, or why it trained nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from streams.records import Lineage, ModelUpdate
from trainer.checkpoints import RoleModel


@dataclass
class WindowResult:
    updates: list[ModelUpdate]
    skipped: str | None = None  # why nothing was trained, if so
    metrics: dict[str, float] | None = None


def model_update(
    rm: RoleModel, step: str, metrics: dict[str, float], parent_ids: list[str]
) -> ModelUpdate:
    assert rm.checkpoint is not None
    version = rm.checkpoint.version_string
    return ModelUpdate(
        role=rm.role,
        version=version,
        path=str(rm.checkpoint.path),
        step=step,
        metrics={k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)},
        parent_ids=parent_ids,
        lineage=Lineage(ancestors=list(parent_ids), models={rm.role: version}),
    )
