"""The cold start's data: annotated (c, z, x) triples from the shipped seed problems, made by the
annotate stage's own code (workers/stages/annotate.py): the teacher model when one is configured,
else from the seed itself, with no model (workers/annotation.py). docs/training.md, "Cold start".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.records import AnnotatedSeed
from streams.topics import SEEDS_ANNOTATED

if TYPE_CHECKING:
    from promptcot.settings import Settings


@dataclass
class ColdStartData:
    seeds: list[AnnotatedSeed]
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> seeds not annotated

    @property
    def success_rate(self) -> float:
        total = len(self.seeds) + sum(self.rejected.values())
        return len(self.seeds) / total if total else 0.0


def cold_start_data(settings: Settings, limit: int | None = None) -> ColdStartData:
    """The first ``trainer.cold_start.seeds`` (or ``limit``) seeds of the configured source,
    annotated in batches of the annotate stage's size."""
    from workers.seeds import load_seeds
    from workers.stages.annotate import AnnotateStage

    cfg = settings.trainer.cold_start
    seeds = load_seeds(cfg.source, "train", limit or cfg.seeds)
    stage = AnnotateStage(settings)
    stage.ensure_ready()
    batch = settings.stage("annotate").batch_size
    data = ColdStartData([])
    try:
        for start in range(0, len(seeds), batch):
            for emit in stage.process(seeds[start : start + batch]):
                if emit.topic is SEEDS_ANNOTATED:
                    data.seeds.append(emit.record)  # type: ignore[arg-type]
                else:
                    data.rejected[emit.record.reason] += 1  # type: ignore[attr-defined]
    finally:
        stage.close()
    return data
