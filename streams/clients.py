"""Plain kafka-python clients for tools and tests: publish records, read a topic back.

Reads use assign() + seek_to_beginning rather than a consumer group: on the embedded broker a
group consumer joins only after session_timeout/2 (docs/broker.md), and tools should not disturb
the workers' groups.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams import serde
from streams.cluster import kafka_python_config
from streams.records import Record
from streams.settings import KafkaSettings
from streams.topics import CATALOGUE, TopicSpec

R = TypeVar("R", bound=Record)


class _CancelledRefresh(logging.Filter):
    """kafka-python 3.0 logs ``Metadata refresh: failed Cancelled`` at ERROR whenever a consumer
    closes with a refresh pending, which every read here does: noise, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith("failed Cancelled")


logging.getLogger("kafka.cluster").addFilter(_CancelledRefresh())


def resolve_topic(kafka: KafkaSettings, name: str) -> tuple[str, TopicSpec]:
    """A short catalogue name ('problems') or a full one ('promptcot.problems')."""
    for spec in CATALOGUE.values():
        if name in (spec.name, spec.full_name(kafka.namespace)):
            return spec.full_name(kafka.namespace), spec
    raise KeyError(f"unknown topic {name!r}; topics: {', '.join(CATALOGUE)}")


def publish(
    kafka: KafkaSettings, bootstrap: str, spec: TopicSpec, records: Iterable[Record]
) -> int:
    producer = KafkaProducer(**kafka_python_config(kafka, bootstrap), acks="all")
    n = 0
    try:
        for record in records:
            key = str(getattr(record, spec.key, record.id) or record.id).encode()
            headers = list(record.headers().items())
            producer.send(
                spec.full_name(kafka.namespace), serde.encode(record), key=key, headers=headers
            )
            n += 1
        producer.flush()
    finally:
        producer.close()
    return n


def read_raw(
    kafka: KafkaSettings, bootstrap: str, topic: str, *, idle_s: float = 2.0, follow: bool = False
) -> Iterator:
    """Every message of ``topic`` from the beginning; stops after ``idle_s`` without news unless
    following."""
    consumer = KafkaConsumer(**kafka_python_config(kafka, bootstrap), enable_auto_commit=False)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        last = time.monotonic()
        while follow or time.monotonic() - last < idle_s:
            batch = consumer.poll(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    last = time.monotonic()
                    yield message
    finally:
        consumer.close()


def read_all(kafka: KafkaSettings, bootstrap: str, topic: str, poll_ms: int = 300) -> Iterator:
    """Every message of ``topic`` as of the call, then stop (no idle guess): reads until each
    partition's position passes its end offset. Tansu reports an end offset inside the last
    batch (docs/broker.md); a batch is fetched whole, so passing it means the batch was read."""
    consumer = KafkaConsumer(**kafka_python_config(kafka, bootstrap), enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        while True:
            batch = consumer.poll(timeout_ms=poll_ms)
            for messages in batch.values():
                yield from messages
            if not batch and all(consumer.position(tp) >= ends[tp] for tp in partitions):
                return
    finally:
        consumer.close()


def read_topic(
    kafka: KafkaSettings,
    name: str,
    *,
    bootstrap: str | None = None,
    follow: bool = False,
    idle_s: float = 2.0,
) -> Iterator[Record]:
    """Decoded records of a topic (unreadable ones are skipped: they are the DLQ's business)."""
    full, spec = resolve_topic(kafka, name)
    messages = read_raw(
        kafka, bootstrap or kafka.bootstrap_servers or "", full, idle_s=idle_s, follow=follow
    )
    yield from decoded(messages, spec.record)


def decoded(messages: Iterable, record_type: type[R]) -> Iterator[R]:
    """The records of ``messages`` as ``record_type``; unreadable ones are skipped."""
    for message in messages:
        try:
            yield serde.decode(message.value, record_type)
        except serde.RecordDecodeError:
            continue
