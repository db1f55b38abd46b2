"""The dead-letter topic as a queue to work through: read it, find the original bytes of a dead
letter, and replay a selection to its source topic once a fix is deployed.

Every replay is recorded on ``<ns>.deadletter.replays`` (the topics are the source of truth on a
cluster, where no machine's disk is), and a dead letter recorded there is never replayed again.
The record is written after the broker acknowledged the replayed copy: a crash between the two
replays that one letter again on the next run, and ids make the repeat harmless downstream.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams import serde
from streams.clients import publish, read_all
from streams.cluster import kafka_python_config
from streams.records import DeadLetter, DeadLetterReplay
from streams.settings import KafkaSettings
from streams.topics import DEAD_LETTER_REPLAYS, DEAD_LETTERS

REPLAY_HEADER = "x-replay-of"


@dataclass(frozen=True)
class Selection:
    """Which dead letters to replay: every given criterion must match (None: any)."""

    reason: str | None = None
    source_topic: str | None = None  # full name
    ids: frozenset[str] | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (self.reason is None or letter.reason == self.reason)
            and (self.source_topic is None or letter.source_topic == self.source_topic)
            and (self.ids is None or letter.id in self.ids)
        )


def dead_letters(kafka: KafkaSettings, bootstrap: str) -> list[DeadLetter]:
    """Every dead letter, each id once (the runtime may dead-letter a redelivered record again)."""
    seen: dict[str, DeadLetter] = {}
    for message in read_all(kafka, bootstrap, DEAD_LETTERS.full_name(kafka.namespace)):
        try:
            letter = serde.decode(message.value, DeadLetter)
        except serde.RecordDecodeError:
            continue
        seen.setdefault(letter.id, letter)
    return list(seen.values())


def replays(kafka: KafkaSettings, bootstrap: str) -> dict[str, DeadLetterReplay]:
    """dead letter id -> its replay record."""
    out: dict[str, DeadLetterReplay] = {}
    for message in read_all(kafka, bootstrap, DEAD_LETTER_REPLAYS.full_name(kafka.namespace)):
        try:
            replay = serde.decode(message.value, DeadLetterReplay)
        except serde.RecordDecodeError:
            continue
        out.setdefault(replay.dead_letter_id, replay)
    return out


def counts(letters: Iterable[DeadLetter]) -> Counter[tuple[str, str]]:
    """(source topic, reason) -> number of dead letters."""
    return Counter((letter.source_topic, letter.reason) for letter in letters)


def copy_of(letter: DeadLetter) -> bytes:
    """The payload the dead letter carries (possibly cut short by the runtime)."""
    return base64.b64decode(letter.payload_b64)


def read_original(
    kafka: KafkaSettings, bootstrap: str, letter: DeadLetter
) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """The bytes and headers at the dead letter's coordinates on its source topic, or
    (None, []) when they are gone (retention) or the coordinates are unknown."""
    if letter.partition < 0 or letter.offset < 0:
        return None, []
    consumer = KafkaConsumer(**kafka_python_config(kafka, bootstrap), enable_auto_commit=False)
    try:
        tp = TopicPartition(letter.source_topic, letter.partition)
        consumer.assign([tp])
        consumer.seek(tp, letter.offset)
        for _ in range(10):  # a few polls: the first may only fetch metadata
            for message in consumer.poll(timeout_ms=500).get(tp, []):
                if message.offset == letter.offset:
                    return message.value, list(message.headers or [])
                if message.offset > letter.offset:  # compacted or deleted
                    return None, []
        return None, []
    finally:
        consumer.close()


@dataclass
class ReplayPlan:
    letter: DeadLetter
    payload: bytes
    headers: list[tuple[str, bytes]]
    bytes_from: str  # "dead_letter" | "source_topic"


def plan(kafka: KafkaSettings, bootstrap: str, letter: DeadLetter) -> ReplayPlan:
    """What replaying ``letter`` sends: the original bytes. The source topic's copy wins (the
    dead letter's may be truncated); if the source no longer holds them, the dead letter's copy
    is used, unless it is known to be incomplete."""
    original, headers = read_original(kafka, bootstrap, letter)
    copy = copy_of(letter)
    if original is not None:
        source = "dead_letter" if original == copy else "source_topic"
        return ReplayPlan(letter, original, headers, source)
    if getattr(letter, "truncated", False):
        raise ValueError(
            f"{letter.id}: the dead letter holds a truncated copy and "
            f"{letter.source_topic}[{letter.partition}]@{letter.offset} is gone; not replayed"
        )
    return ReplayPlan(letter, copy, [], "dead_letter")


def replay(kafka: KafkaSettings, bootstrap: str, plans: list[ReplayPlan]) -> list[DeadLetterReplay]:
    """Send each plan's bytes to its source topic (original key and headers, plus
    ``x-replay-of``), then record the replays."""
    producer = KafkaProducer(**kafka_python_config(kafka, bootstrap), acks="all")
    done: list[DeadLetterReplay] = []
    try:
        for p in plans:
            headers = [(k, v) for k, v in p.headers if k != REPLAY_HEADER]
            headers.append((REPLAY_HEADER, p.letter.id.encode()))
            key = p.letter.key.encode() if p.letter.key is not None else None
            meta = producer.send(p.letter.source_topic, p.payload, key=key, headers=headers).get(
                timeout=30
            )
            done.append(
                DeadLetterReplay.derived_from(
                    p.letter,
                    dead_letter_id=p.letter.id,
                    reason=p.letter.reason,
                    source_topic=p.letter.source_topic,
                    partition=p.letter.partition,
                    offset=p.letter.offset,
                    replayed_partition=meta.partition,
                    replayed_offset=meta.offset,
                    bytes_from=p.bytes_from,
                )
            )
    finally:
        producer.flush()
        producer.close()
        if done:
            publish(kafka, bootstrap, DEAD_LETTER_REPLAYS, done)
    return done
