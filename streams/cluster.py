"""The cluster the workers talk to: connection settings passed through to every client
(kafka-python for admin and tools, Faust for the workers), and ``Cluster``, which connects to a
configured cluster or starts the embedded broker."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from streams.broker import EmbeddedBroker
from streams.settings import EmbeddedBrokerSettings, KafkaSettings
from streams.topics import ensure_topics


def kafka_python_config(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments shared by kafka-python's admin, producer and consumer."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        config["sasl_mechanism"] = kafka.sasl_mechanism
        config["sasl_plain_username"] = kafka.sasl_username
        config["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
        )
    if kafka.ssl_cafile:
        config["ssl_cafile"] = kafka.ssl_cafile
    if kafka.ssl_certfile:
        config["ssl_certfile"] = kafka.ssl_certfile
    if kafka.ssl_keyfile:
        config["ssl_keyfile"] = kafka.ssl_keyfile
    return config


class ClusterUnreachable(ConnectionError):
    """No broker answered at the bootstrap address."""


def check_reachable(kafka: KafkaSettings, bootstrap: str, timeout_s: float = 10.0) -> None:
    """Raise ClusterUnreachable, naming the address, unless a broker answers within
    ``timeout_s`` (kafka-python would otherwise retry for minutes)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    ms = int(timeout_s * 1000)
    # kafka-python logs every refused attempt; the one line below says it all.
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        admin = KafkaAdminClient(
            **kafka_python_config(kafka, bootstrap), bootstrap_timeout_ms=ms, request_timeout_ms=ms
        )
    except (KafkaError, OSError) as exc:
        raise ClusterUnreachable(
            f"cannot reach Kafka at {bootstrap} within {timeout_s:g} s ({type(exc).__name__})"
        ) from exc
    finally:
        kafka_log.setLevel(level)
    admin.close()


def aiokafka_config(kafka: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients used beside Faust (e.g. a group-less reader)."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        if kafka.ssl_certfile:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
        config["ssl_context"] = context
    if kafka.sasl_mechanism:
        config["sasl_mechanism"] = kafka.sasl_mechanism
        config["sasl_plain_username"] = kafka.sasl_username
        config["sasl_plain_password"] = (
            kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
        )
    return config


def faust_credentials(kafka: KafkaSettings) -> Any | None:
    """Faust's credentials object for SASL and/or TLS, or None for plaintext."""
    import faust

    ssl_context = None
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        if kafka.ssl_certfile:
            ssl_context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
    if kafka.sasl_mechanism:
        password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else ""
        return faust.SASLCredentials(
            username=kafka.sasl_username or "",
            password=password,
            mechanism=kafka.sasl_mechanism,
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return faust.SSLCredentials(ssl_context)
    return None


@dataclass
class Cluster:
    """Where the workers connect: a configured cluster, or an embedded broker we own. Either
    way every catalogue topic exists once ``connect`` returns."""

    bootstrap: str
    broker: EmbeddedBroker | None = None

    @classmethod
    def connect(cls, kafka: KafkaSettings, embedded: EmbeddedBrokerSettings) -> Cluster:
        if kafka.bootstrap_servers:
            cluster = cls(kafka.bootstrap_servers)
        else:
            data_dir = None if embedded.ephemeral else embedded.data_dir
            broker = EmbeddedBroker(embedded, data_dir=data_dir).start()
            cluster = cls(broker.bootstrap_servers, broker)
        ensure_topics(
            kafka_python_config(kafka, cluster.bootstrap),
            kafka.namespace,
            kafka.partitions,
            kafka.replication_factor,
        )
        return cluster

    def close(self) -> None:
        if self.broker is not None:
            self.broker.stop()
