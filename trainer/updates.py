"""What a training window produces: the model updates it announces (new, or announced again for
a redelivered window), or why it trained nothing; and the trainer's Prometheus metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams import metrics
from streams.records import AnnotatedSeed, Lineage, ModelUpdate, version_number
from trainer.role_models import RoleModel


@dataclass
class WindowResult:
    updates: list[ModelUpdate]
    skipped: str | None = None  # why nothing was trained, if so
    metrics: dict[str, float] | None = None
    next_epoch: list[AnnotatedSeed] = field(default_factory=list)  # seeds to visit again


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def model_update(
    rm: RoleModel, step: str, step_metrics: dict[str, float], parent_ids: list[str]
) -> ModelUpdate:
    assert rm.checkpoint is not None
    version = rm.checkpoint.version_string
    update = ModelUpdate(
        role=rm.role,
        version=version,
        path=str(rm.checkpoint.path),
        step=step,
        metrics=_finite(step_metrics),
        parent_ids=parent_ids,
        lineage=Lineage(ancestors=list(parent_ids), models={rm.role: version}),
    )
    publish_metrics(update)
    return update


def update_from_manifest(manifest: dict[str, Any]) -> ModelUpdate | None:
    """The update a checkpoint was announced with, rebuilt from its manifest (same id: a
    consumer that saw it already keeps the first). None when its folder was pruned: newer
    versions of the role were announced since."""
    path = str(manifest.get("path", ""))
    if not path or not Path(path).is_dir():
        return None
    role, step = str(manifest["role"]), str(manifest["step"])
    version = f"{role}/v{int(manifest['version']):04d}-{step}"
    parents = [str(p) for p in manifest.get("parent_ids", [])]
    return ModelUpdate(
        role=role,
        version=version,
        path=path,
        step=step,
        metrics=_finite(manifest.get("metrics", {})),
        parent_ids=parents,
        lineage=Lineage(ancestors=parents, models={role: version}),
    )


def publish_metrics(update: ModelUpdate) -> None:
    """The trainer's gauges (streams/metrics.py) from one announced update."""
    m, role = update.metrics, update.role
    metrics.MODEL_VERSION.labels(role=role).set(version_number(update.version) or 0)
    if "train_loss" in m:
        metrics.TRAINER_LOSS.labels(role=role, step=update.step).set(m["train_loss"])
    # The held-out gauges carry held-out figures only: a window measured on its training items
    # (no held-out pool yet) would make the series jump between two different measurements.
    for key in ("heldout_problem_nll_after", "heldout_trace_nll_after"):
        if key in m:
            metrics.TRAINER_HELDOUT_NLL.labels(role=role).set(m[key])
    for key in ("heldout_reward_after", "train_reward_after", "mean_best_reward"):
        if key in m:
            metrics.TRAINER_REWARD.labels(role=role).set(m[key])
            break
    if "heldout_rationale_tokens_after" in m:
        metrics.TRAINER_RATIONALE_TOKENS.labels(role=role).set(m["heldout_rationale_tokens_after"])
    if "heldout_margin_after" in m:
        metrics.TRAINER_MARGIN.labels(role=role).set(m["heldout_margin_after"])
