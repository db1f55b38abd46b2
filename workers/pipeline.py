"""The wiring, in one place: which stages exist, in pipeline order, and how a process runs some
of them against a cluster (or the embedded broker).

Stage classes are imported lazily so `promptcot worker sink` never loads torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from streams.broker import EmbeddedBroker
from streams.cluster import kafka_python_config
from streams.settings import Settings
from streams.topics import ensure_topics
from workers.stage import Stage

log = logging.getLogger(__name__)

# name -> "module:Class", in the order records flow (DESIGN §2).
STAGES: dict[str, str] = {
    "annotate": "workers.stages.annotate:AnnotateStage",
    "rationale": "workers.stages.rationale:RationaleStage",
    "sampler": "workers.stages.sampler:SamplerStage",
    "generate": "workers.stages.generate:GenerateStage",
    "filter": "workers.stages.filter:FilterStage",
    "verify": "workers.stages.verify:VerifyStage",
    "pairs": "workers.stages.pairs:PairsStage",
    "sink": "workers.stages.sink:SinkStage",
    "em": "trainer.stages:EStepStage",
    "dpo": "trainer.stages:DPOStage",
    "model_reload": "trainer.stages:ModelReloadStage",
}
TRAINER_STAGES = ("em", "dpo", "model_reload")
# What `promptcot up` runs unless told otherwise: the data path. Training a 135M model on two
# CPU cores takes minutes per window, so the trainer joins with `up --train`.
DEFAULT_UP_STAGES = tuple(name for name in STAGES if name not in TRAINER_STAGES)


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_stage(name: str, settings: Settings) -> Stage:
    return stage_class(name)(settings)


@dataclass
class Cluster:
    """Where the workers connect: a configured cluster, or an embedded broker we own."""

    bootstrap: str
    broker: EmbeddedBroker | None = None

    @classmethod
    def connect(cls, settings: Settings) -> Cluster:
        if settings.kafka.bootstrap_servers:
            cluster = cls(settings.kafka.bootstrap_servers)
        else:
            broker = EmbeddedBroker(settings.embedded_broker).start()
            cluster = cls(broker.bootstrap_servers, broker)
        ensure_topics(
            kafka_python_config(settings.kafka, cluster.bootstrap),
            settings.kafka.namespace,
            settings.kafka.partitions,
            settings.kafka.replication_factor,
        )
        return cluster

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()


async def run_stages(
    settings: Settings,
    stage_names: list[str],
    bootstrap: str,
    *,
    app_id: str | None = None,
    until: Callable[[], Awaitable[None]] | None = None,
    stages: list[Stage] | None = None,
) -> list[Stage]:
    """Run the named stages in one Faust app until ``until()`` returns (default: forever).

    Each process joins one consumer group per app id; a single-stage worker gets its own group,
    so `promptcot worker generate` on ten machines splits the concept partitions ten ways.
    """
    from workers.runtime import StageAgent, build_app

    group = app_id or f"{settings.kafka.consumer_group_prefix}-{'-'.join(stage_names)}"
    app = build_app(settings, bootstrap, group)
    stages = stages or [make_stage(name, settings) for name in stage_names]
    # One thread per stage: stages overlap (filter embeds while verify solves); a model shared
    # by two roles serializes itself with its own lock.
    executor = ThreadPoolExecutor(max_workers=max(2, len(stages)), thread_name_prefix="stage")
    for stage in stages:
        StageAgent(app, stage, settings, executor)
    await app.start()
    try:
        if until is None:
            await asyncio.Event().wait()
        else:
            await until()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(), timeout=30)
        executor.shutdown(wait=False, cancel_futures=True)
        for stage in stages:
            with contextlib.suppress(Exception):
                stage.close()
    return stages
