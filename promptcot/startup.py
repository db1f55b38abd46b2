"""How a run of the factory starts, whatever starts it (`promptcot up`, `promptcot worker`,
`promptcot seeds load`, bench/loop.py, the tests): which stages it runs and how each is loaded
from the registry, the consumer group it reads in, the seeds it publishes, the models it serves,
and the settings of a run that keeps nothing. The CLI parses its options and calls these.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from promptcot.registry import DATA_STAGES, STAGES, TRAINER_STAGES

if TYPE_CHECKING:
    from promptcot.settings import Settings
    from streams.records import SeedProblem
    from streams.settings import KafkaSettings
    from workers.settings import ConceptSettings
    from workers.stage import Stage

FACTORY_GROUP = "promptcot-factory"  # `up` runs every stage in one consumer group


def stage_class(name: str) -> type[Stage]:
    """The class of a registered stage, imported on demand (``promptcot worker sink`` never
    loads torch)."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module, cls = STAGES[name].target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_stage(name: str, settings: Settings) -> Stage:
    return stage_class(name)(settings)


def stage_names(stages: str | None, train: bool) -> list[str]:
    """The stages `up` runs: ``stages`` (its --stages option) exactly as listed (name em/dpo
    there to train), else the data path plus the trainer unless not ``train``."""
    if stages:
        names = [s.strip() for s in stages.split(",")]
    else:
        names = list(DATA_STAGES) + (list(TRAINER_STAGES) if train else [])
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        import typer

        raise typer.BadParameter(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    return names


def worker_group(stage: str, kafka: KafkaSettings, concepts: ConceptSettings) -> str | None:
    """The consumer group a `promptcot worker` reads in (None: the stage's own). A sampler
    closes only its own concept sets, so every replica must see every verdict: one consumer
    group per sampler seed (workers/stages/sampler.py)."""
    if stage == "sampler":
        return f"{kafka.consumer_group_prefix}-sampler-{concepts.seed}"
    return None


def ephemeral_overrides(scratch: Path) -> dict:
    """Settings of a run that keeps nothing: everything it writes goes under ``scratch``."""
    return {
        "embedded_broker": {"ephemeral": True},
        "vectorstore": {"store": {"uri": str(scratch / "vectorstore")}},
        "sink": {"output_dir": str(scratch)},
        "worker": {"journal_dir": str(scratch / "journal")},
        "trainer": {"checkpoint_dir": str(scratch / "checkpoints")},
    }


def serve_newest(settings: Settings) -> None:
    """Every trained role starts on its newest checkpoint (a LoRA one on its base), not on the
    base model: a restarted factory goes on where its models were."""
    from llm.roles import Role
    from trainer.checkpoints import CheckpointStore

    store = CheckpointStore(settings.trainer.checkpoint_dir)
    for role in (Role.PROMPT_MODEL, Role.RATIONALE_MODEL, Role.SOLVER):
        newest = store.latest(role)
        if newest is not None:
            settings.models.role(role).model = str(newest.path)


def up_seeds(settings: Settings, names: list[str], n: int) -> list[SeedProblem]:
    """The GSM8K train seeds `up` publishes: with the trainer among the stages, the n after the
    cold start's, so that the M-steps learn from problems the cold start did not fit p_θ on
    (on its own seeds p_θ's held-out NLL stayed flat, then rose: docs/training.md)."""
    from workers.seeds import load_seeds

    skip = settings.trainer.cold_start.seeds if "em" in names else 0
    return load_seeds("gsm8k", "train", n, skip=skip)


def publish_seeds(kafka: KafkaSettings, bootstrap: str, seeds: list[SeedProblem]) -> int:
    from streams.clients import publish
    from streams.topics import SEEDS

    return publish(kafka, bootstrap, SEEDS, seeds)
