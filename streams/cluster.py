"""Cluster settings passed through to every client: kafka-python (admin, tools) and Faust."""

from __future__ import annotations

import ssl
from typing import Any

from streams.settings import KafkaSettings


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
