"""The root settings: one typed object that composes every layer's sections.

Sources, highest first: constructor arguments, environment (``PROMPTCOT_*``, nested with ``__``,
e.g. ``PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS``), a YAML file (``PROMPTCOT_CONFIG`` or ``--config``),
then the defaults, which are the embedded single-machine factory. Every source may set one key
deep inside a section and leaves its siblings alone. An unknown key anywhere is an error that
names its full path and the nearest valid name.

Where each section is defined (docs/architecture.md has the table): ``kafka``,
``embedded_broker``, ``metrics`` in streams/settings.py; ``models`` in llm/roles.py;
``stages`` here, from the stage registry; the worker sections in workers/settings.py;
``vectorstore`` in vectorstore/settings.py; ``trainer`` in trainer/settings.py.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from llm.roles import ModelRoles
from promptcot.registry import STAGES
from streams.settings import (
    EmbeddedBrokerSettings,
    KafkaSettings,
    MetricsSettings,
    Section,
    deep_merge,
)
from trainer.settings import (
    PROFILE_CONCEPTS,
    PROFILE_SAMPLING,
    PROFILE_WINDOWS,
    PROFILES,
    TrainerSettings,
    resolve_profile,
)
from vectorstore.settings import VectorStoreSettings
from workers.settings import (
    AnnotateSettings,
    ConceptSettings,
    GenerationSettings,
    PairSettings,
    RationaleSettings,
    SamplerSettings,
    SinkSettings,
    StageRuntime,
    TraceSettings,
    VerifySettings,
    WorkerSettings,
)

ENV_PREFIX = "PROMPTCOT_"
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("promptcot_config_file", default=None)


class SettingsError(ValueError):
    """Settings that cannot be used: one line per problem, each naming the key path."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


StagesSettings: type[Section] = create_model(  # one field per registered stage
    "StagesSettings",
    __base__=Section,
    __doc__="Micro-batching and parallelism per stage (defaults from promptcot/registry.py).",
    **{
        name: (StageRuntime, Field(default_factory=spec.runtime.model_copy))
        for name, spec in STAGES.items()
    },
)


class Settings(BaseSettings, Section):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    embedded_broker: EmbeddedBrokerSettings = Field(default_factory=EmbeddedBrokerSettings)
    stages: StagesSettings = Field(default_factory=StagesSettings)  # type: ignore[valid-type]
    models: ModelRoles = Field(default_factory=ModelRoles)
    concepts: ConceptSettings = Field(default_factory=ConceptSettings)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    pairs: PairSettings = Field(default_factory=PairSettings)
    traces: TraceSettings = Field(default_factory=TraceSettings)
    annotate: AnnotateSettings = Field(default_factory=AnnotateSettings)
    rationale: RationaleSettings = Field(default_factory=RationaleSettings)
    vectorstore: VectorStoreSettings = Field(default_factory=VectorStoreSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log_level: str = "WARNING"

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(explain(exc)) from None

    @model_validator(mode="before")
    @classmethod
    def _trainer_profile(cls, data: Any) -> Any:
        """Apply the trainer profile (trainer/settings.py) to the ``trainer`` section, the trainer
        stages' windows (``stages.em`` / ``stages.dpo``), the E-step sampling (``rationale``)
        and the sampler's difficulty ladders (``concepts``), under any key set explicitly.
        Here, before the sections fill in their defaults, so an explicit key is still told
        apart from a default."""
        if not isinstance(data, dict) or isinstance(data.get("trainer"), TrainerSettings):
            return data
        trainer = data.get("trainer", {})
        stages = data.get("stages", {})
        rationale = data.get("rationale", {})
        concepts = data.get("concepts", {})
        if not all(isinstance(x, dict) for x in (trainer, stages, rationale, concepts)):
            return data
        try:
            profile = resolve_profile(trainer.get("profile", "auto"))
        except ValueError:
            return data  # the trainer section reports the bad value with its path
        return {
            **data,
            "trainer": {**deep_merge(PROFILES[profile], trainer), "profile": profile},
            "stages": deep_merge(PROFILE_WINDOWS[profile], stages),
            "rationale": deep_merge(PROFILE_SAMPLING[profile], rationale),
            "concepts": deep_merge(PROFILE_CONCEPTS[profile], concepts),
        }

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
        return getattr(self.stages, name)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and an optional YAML file (the CLI's ``--config``).
    Raises SettingsError for a missing or unreadable file, a ``PROMPTCOT_*`` variable that
    names no setting, and any invalid key."""
    path = _config_path(config_file)
    if path is not None:
        _read_yaml(path)  # a file that is not a YAML mapping fails here, in one line
    problems = unknown_env_settings(os.environ)
    if problems:
        raise SettingsError(problems)
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE.reset(token)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError(
            [f"{path}: not valid YAML{where}: {exc.problem or exc.context}"]
        ) from None
    except yaml.YAMLError as exc:
        raise SettingsError([f"{path}: not valid YAML: {_one_line(exc)}"]) from None
    if data is not None and not isinstance(data, dict):
        raise SettingsError(
            [f"{path}: not a mapping of settings (its top level is a {type(data).__name__})"]
        )
    return data or {}


def unknown_env_settings(environ: typing.Mapping[str, str]) -> list[str]:
    """``PROMPTCOT_*`` variables meant as settings that name none; the environment source would
    ignore them silently (a typo'd ``PROMPTCOT_KAFKA_BOOTSTRAP_SERVERS`` would start the
    embedded broker). A variable is meant as a setting when it nests (``__``) or starts with a
    section's name; others (``PROMPTCOT_CONFIG``, ``PROMPTCOT_DEBUG``) are not settings."""
    fields = list(Settings.model_fields)
    problems = []
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        top = name.split("__")[0]
        if top in fields:
            continue
        if "__" in name:
            near = difflib.get_close_matches(top, fields, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(fields)}"
            problems.append(f"{top} (env {var}): unknown key; {hint}")
            continue
        section = next((f for f in fields if name.startswith(f + "_")), None)
        if section is not None:
            nested = ENV_PREFIX + f"{section}__{name[len(section) + 1 :]}".upper()
            problems.append(f"{var}: not a setting; nested keys take two underscores: {nested}")
    return problems


def _config_path(config_file: str | Path | None) -> Path | None:
    path = Path(config_file) if config_file is not None else None
    if path is None and os.environ.get("PROMPTCOT_CONFIG"):
        path = Path(os.environ["PROMPTCOT_CONFIG"])
    if path is not None and not path.is_file():
        raise SettingsError([f"config file not found: {path}"])
    return path


# --- error messages ----------------------------------------------------------------------------


def explain(exc: ValidationError) -> list[str]:
    """One line per validation error: the full key path, where its value came from (an
    environment variable or the YAML file), what is wrong, and for an unknown key the nearest
    valid name."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        path = (".".join(loc) or "<root>") + _origin(loc, error.get("input"))
        if error["type"] == "extra_forbidden":
            known = _keys_at(Settings, loc[:-1])
            near = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(known)}"
            lines.append(f"{path}: unknown key; {hint}")
        else:
            given = error.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"{path}: {error['msg']}{shown}")
    return lines


def _keys_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the section found by walking ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]  # a mapping's value or a list's item
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _origin(loc: list[str], given: Any = None) -> str:
    """`` (env NAME)`` or `` (file PATH)`` for the source that set the key at ``loc`` (the
    environment wins, as it does for values); empty for values given in code (a scalar that is
    not the variable's value was given in code, which wins over the environment)."""
    env = {name.upper(): name for name in os.environ}
    for n in range(len(loc), 0, -1):  # PROMPTCOT_A__B__C, then PROMPTCOT_A__B (JSON), ...
        name = ENV_PREFIX + "__".join(loc[:n]).upper()
        if name in env:
            value = os.environ[env[name]]
            if n == len(loc) and isinstance(given, str | int | float) and str(given) != value:
                return ""
            return f" (env {env[name]})"
    config = _CONFIG_FILE.get() or os.environ.get("PROMPTCOT_CONFIG")
    if config:
        node: Any = yaml.safe_load(Path(config).read_text())
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return ""
        return f" (file {config})"
    return ""


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# --- where each value comes from ---------------------------------------------------------------


def sources(config_file: str | Path | None = None) -> dict[str, str]:
    """Key path -> where its value comes from (``env PROMPTCOT_...`` or ``file <path>``) for
    every key set by the environment or the YAML file; unlisted keys are defaults."""
    path = _config_path(config_file)
    out: dict[str, str] = {}
    if path is not None:
        data = yaml.safe_load(path.read_text()) or {}
        for key in _leaves(data):
            out[key] = f"file {path}"
    env = EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__")()
    for key in _leaves(env):
        out[key] = f"env {ENV_PREFIX}{key.replace('.', '__').upper()}"
    return out


def _leaves(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix] if prefix else []
    keys = []
    for key, value in data.items():
        keys += _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return keys
