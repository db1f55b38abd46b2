"""The dead-letter topic as a queue to work through: read it, find the original bytes of a dead
letter, and replay a selection to its source topic once a fix is deployed.

A replay is per source record (its topic, partition and offset): every stage reading a topic
dead-letters a bad record once (three for ``verdicts``), and one copy back on the topic reaches
all of them. Every replay is recorded on ``<ns>.deadletter.replays`` (the topics are the source
of truth on a cluster, where no machine's disk is), and a source record recorded there is never
replayed again. The record is written after the broker acknowledged the replayed copy: a crash
between the two replays that record again on the next run, and ids make the repeat harmless.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streams.clients import decoded, publish, read_all
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
    messages = read_all(kafka, bootstrap, DEAD_LETTERS.full_name(kafka.namespace))
    for letter in decoded(messages, DeadLetter):
        seen.setdefault(letter.id, letter)
    return list(seen.values())


Coordinates = tuple[str, int, int]  # source topic, partition, offset


def coordinates(letter: DeadLetter | DeadLetterReplay) -> Coordinates:
    return (letter.source_topic, letter.partition, letter.offset)


def replays(kafka: KafkaSettings, bootstrap: str) -> dict[Coordinates, DeadLetterReplay]:
    """Source record -> its replay."""
    out: dict[Coordinates, DeadLetterReplay] = {}
    messages = read_all(kafka, bootstrap, DEAD_LETTER_REPLAYS.full_name(kafka.namespace))
    for replay in decoded(messages, DeadLetterReplay):
        out.setdefault(coordinates(replay), replay)
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
    letters: list[DeadLetter]  # every dead letter of one source record
    payload: bytes
    headers: list[tuple[str, bytes]]
    bytes_from: str  # "dead_letter" | "source_topic"

    @property
    def first(self) -> DeadLetter:
        return self.letters[0]


def plan(kafka: KafkaSettings, bootstrap: str, letters: list[DeadLetter]) -> ReplayPlan:
    """What replaying one source record sends: its original bytes and headers, read back at the
    dead letters' coordinates; if the source topic no longer holds them (retention), the dead
    letter's copy, unless that copy was cut short (``payload_truncated``)."""
    letter = letters[0]
    original, headers = read_original(kafka, bootstrap, letter)
    if original is not None:
        return ReplayPlan(letters, original, headers, "source_topic")
    if letter.payload_truncated:
        raise ValueError(
            f"{letter.id}: the dead letter holds {len(copy_of(letter)):,} of "
            f"{letter.payload_size:,} bytes and {letter.source_topic}[{letter.partition}]@"
            f"{letter.offset} is gone; not replayed"
        )
    return ReplayPlan(letters, copy_of(letter), [], "dead_letter")


def plans(kafka: KafkaSettings, bootstrap: str, letters: list[DeadLetter]) -> list[ReplayPlan]:
    """One plan per source record of ``letters``."""
    by_source: dict[Coordinates, list[DeadLetter]] = {}
    for letter in letters:
        by_source.setdefault(coordinates(letter), []).append(letter)
    return [plan(kafka, bootstrap, group) for group in by_source.values()]


def replay(
    kafka: KafkaSettings, bootstrap: str, to_send: list[ReplayPlan]
) -> list[DeadLetterReplay]:
    """Send each plan's bytes to its source topic (original key and headers, plus
    ``x-replay-of``: the dead letter ids), then record the replays."""
    producer = KafkaProducer(**kafka_python_config(kafka, bootstrap), acks="all")
    done: list[DeadLetterReplay] = []
    try:
        for p in to_send:
            ids = [letter.id for letter in p.letters]
            headers = [(k, v) for k, v in p.headers if k != REPLAY_HEADER]
            headers.append((REPLAY_HEADER, ",".join(ids).encode()))
            key = p.first.key.encode() if p.first.key is not None else None
            meta = producer.send(p.first.source_topic, p.payload, key=key, headers=headers).get(
                timeout=30
            )
            done.append(
                DeadLetterReplay.derived_from(
                    p.first,
                    dead_letter_ids=ids,
                    reason=p.first.reason,
                    source_topic=p.first.source_topic,
                    partition=p.first.partition,
                    offset=p.first.offset,
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
