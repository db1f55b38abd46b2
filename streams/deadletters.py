"""The dead-letter topic as a queue to work through: read it, find the original bytes of a dead
letter, and replay a selection to its source topic once a fix is deployed.

A replay is per source record (its topic, partition and offset): every stage reading a topic
dead-letters a bad record once (three for ``verdicts``), and one copy back on the topic reaches
all of them. Every replay is recorded on ``<ns>.deadletter.replays`` (the topics are the source
of truth on a cluster, where no machine's disk is), and a source record recorded there is never
replayed again. The record is written after the broker acknowledged the replayed copy: a crash
between the two replays that record again on the next run, and ids make the repeat harmless.

A replayed copy that fails again is dead-lettered at its own coordinates, a new source record;
it is held back (``failed again``) unless asked for, or every replay of a record the fix did not
mend would send it once more. A record the producer cannot send (over its request size, refused
by the broker) is reported and skipped, and the rest of the selection still goes back.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    CorruptRecordError,
    InvalidRecordError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from streams.clients import decoded, publish, read_all
from streams.cluster import kafka_python_config
from streams.records import DeadLetter, DeadLetterReplay
from streams.settings import KafkaSettings
from streams.topics import DEAD_LETTER_REPLAYS, DEAD_LETTERS

REPLAY_HEADER = "x-replay-of"
# What the producer or the broker refuses for one record: that record is skipped, not the rest.
# Anything else (the cluster gone, a timeout) stops the replay; what was sent is still recorded.
REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    InvalidRecordError,
    CorruptRecordError,
)


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


def replayed_copies(done: dict[Coordinates, DeadLetterReplay]) -> set[Coordinates]:
    """Where the replayed copies landed: a dead letter at one of these failed again after a
    replay."""
    return {(r.source_topic, r.replayed_partition, r.replayed_offset) for r in done.values()}


@dataclass
class Choice:
    """A selection's dead letters split by what a replay does with them."""

    fresh: list[DeadLetter]  # to replay
    replayed_before: int  # source records already replayed
    failed_again: int  # source records that are replayed copies, held back (without ``again``)


def choose(
    letters: Iterable[DeadLetter],
    done: dict[Coordinates, DeadLetterReplay],
    selection: Selection,
    again: bool = False,
) -> Choice:
    """The dead letters of ``selection`` still to replay: each source record once, and a
    replayed copy that failed again only when ``again``."""
    chosen = [d for d in letters if selection.matches(d)]
    copies = replayed_copies(done)
    before = {coordinates(d) for d in chosen if coordinates(d) in done}
    held = {coordinates(d) for d in chosen if coordinates(d) in copies} - before
    skip = before if again else before | held
    fresh = [d for d in chosen if coordinates(d) not in skip]
    return Choice(fresh, len(before), 0 if again else len(held))


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
class Unsent:
    """Dead letters of one source record that a replay could not send, and why."""

    letters: list[DeadLetter]
    why: str

    @property
    def first(self) -> DeadLetter:
        return self.letters[0]


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


def plans(
    kafka: KafkaSettings, bootstrap: str, letters: list[DeadLetter]
) -> tuple[list[ReplayPlan], list[Unsent]]:
    """One plan per source record of ``letters``, and the source records with no bytes left to
    send."""
    by_source: dict[Coordinates, list[DeadLetter]] = {}
    for letter in letters:
        by_source.setdefault(coordinates(letter), []).append(letter)
    out: list[ReplayPlan] = []
    unsent: list[Unsent] = []
    for group in by_source.values():
        try:
            out.append(plan(kafka, bootstrap, group))
        except ValueError as exc:
            unsent.append(Unsent(group, str(exc)))
    return out, unsent


def replay(
    kafka: KafkaSettings, bootstrap: str, to_send: list[ReplayPlan]
) -> tuple[list[DeadLetterReplay], list[Unsent]]:
    """Send each plan's bytes to its source topic (original key and headers, plus
    ``x-replay-of``: the dead letter ids), then record the replays. A record the producer or
    the broker refuses (``REFUSED``) is returned unsent with the reason; the others still go."""
    producer = KafkaProducer(
        **kafka_python_config(kafka, bootstrap),
        acks="all",
        max_request_size=kafka.max_request_bytes,  # what the stages may have written
    )
    done: list[DeadLetterReplay] = []
    unsent: list[Unsent] = []
    try:
        for p in to_send:
            ids = [letter.id for letter in p.letters]
            headers = [(k, v) for k, v in p.headers if k != REPLAY_HEADER]
            headers.append((REPLAY_HEADER, ",".join(ids).encode()))
            key = p.first.key.encode() if p.first.key is not None else None
            try:
                meta = producer.send(p.first.source_topic, p.payload, key=key, headers=headers).get(
                    timeout=30
                )
            except REFUSED as exc:
                unsent.append(Unsent(p.letters, _refusal(exc, len(p.payload), kafka)))
                continue
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
    return done, unsent


def _refusal(exc: Exception, size: int, kafka: KafkaSettings) -> str:
    if isinstance(exc, (MessageSizeTooLargeError, RecordListTooLargeError)):
        return (
            f"too large: {size:,} bytes, over what the producer takes ({kafka.max_request_bytes:,}"
            ", kafka.max_record_bytes + 64 KiB) or the broker (its message.max.bytes); raise "
            "them to replay it"
        )
    return f"refused: {type(exc).__name__}: {' '.join(str(exc).split())}"
