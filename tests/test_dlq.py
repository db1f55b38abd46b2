"""`promptcot dlq` through the real broker: dead letters counted by source topic and reason, one
shown (JSON or hex), and a selection replayed to its source topic with the original bytes (read
back from the source when the dead letter's copy was cut short), each dead letter only once."""

from __future__ import annotations

import base64
import json

import pytest
from factory_harness import factory_settings
from kafka import KafkaProducer
from typer.testing import CliRunner

from promptcot.cli import app
from streams import serde
from streams.broker import EmbeddedBroker
from streams.clients import publish, read_all
from streams.cluster import kafka_python_config
from streams.records import DeadLetter
from streams.topics import CONCEPTS, DEAD_LETTERS, VERDICTS, ensure_topics

runner = CliRunner()
BIG = json.dumps({"id": "cset_x", "concepts": ["a" * 50_000]}).encode()


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as b:
        yield b


def _dead(settings, topic_spec, payload: bytes, reason: str, truncate: int | None = None):
    """Send ``payload`` to the source topic, then its dead letter (as the runtime writes it)."""
    kafka = settings.kafka
    producer = KafkaProducer(**kafka_python_config(kafka, kafka.bootstrap_servers))
    topic = topic_spec.full_name(kafka.namespace)
    meta = producer.send(topic, payload, key=b"k", headers=[("x-record-kind", b"t")]).get(10)
    producer.close()
    letter = serde.dead_letter(
        stage="generate",
        error=serde.RecordDecodeError(reason, "bad"),
        topic=topic,
        partition=meta.partition,
        offset=meta.offset,
        key=b"k",
        payload=payload[:truncate] if truncate else payload,
    )
    publish(kafka, kafka.bootstrap_servers, DEAD_LETTERS, [letter])
    return letter


def _cli(settings, *args):
    env = {
        "PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "PROMPTCOT_KAFKA__NAMESPACE": settings.kafka.namespace,
        "COLUMNS": "200",
    }
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def _source_values(settings, spec) -> list[tuple[bytes, dict]]:
    topic = spec.full_name(settings.kafka.namespace)
    return [
        (m.value, dict(m.headers))
        for m in read_all(settings.kafka, settings.kafka.bootstrap_servers, topic)
    ]


def test_counts_show_and_replay_each_dead_letter_once(broker, tmp_path):
    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    garbage = _dead(settings, CONCEPTS, b"\xff\xfe not json", serde.UNDECODABLE)
    big = _dead(settings, CONCEPTS, BIG, serde.SCHEMA_INVALID, truncate=1000)
    verdict = _dead(settings, VERDICTS, b'{"schema_version": 99}', serde.SCHEMA_INVALID)

    counts = _cli(settings, "dlq", "counts")
    ns = kafka.namespace
    assert f"{ns}.concepts" in counts and f"{ns}.verdicts" in counts
    assert "3 dead letters, 0 replayed" in counts
    rows = {tuple(line.split("│")[1:4]) for line in counts.splitlines() if "│" in line}
    assert any(r[0].strip() == f"{ns}.concepts" and r[1].strip() == "undecodable" for r in rows)

    shown = _cli(settings, "dlq", "show", garbage.id)
    assert "ff fe 20 6e 6f 74" in shown and garbage.source_topic in shown
    assert '"schema_version": 99' in _cli(settings, "dlq", "show", verdict.id)

    # Replay what came from the concepts topic: the big one's copy was truncated, so its bytes
    # are read back from the source topic at the dead letter's coordinates.
    out = _cli(settings, "dlq", "replay", "--topic", "concepts")
    assert "replayed 2; 0 already replayed before" in out
    assert f"{len(BIG):,} bytes from the source topic" in out
    replayed = [(v, h) for v, h in _source_values(settings, CONCEPTS) if "x-replay-of" in h]
    assert sorted(v for v, _ in replayed) == sorted([b"\xff\xfe not json", BIG])
    assert {h["x-replay-of"].decode() for _, h in replayed} == {garbage.id, big.id}
    assert all(h["x-record-kind"] == b"t" for _, h in replayed)  # original headers kept

    # Nothing replays twice: again by reason, then everything.
    assert "replayed 0; 1 already replayed before" in _cli(
        settings, "dlq", "replay", "--reason", "undecodable"
    )
    assert "replayed 1; 2 already replayed before" in _cli(settings, "dlq", "replay", "--all")
    assert len([1 for _, h in _source_values(settings, VERDICTS) if "x-replay-of" in h]) == 1
    assert "3 dead letters, 3 replayed" in _cli(settings, "dlq", "counts")


def test_replay_needs_a_selection(broker, tmp_path):
    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    env = {"PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
    result = runner.invoke(app, ["dlq", "replay"], env=env)
    assert result.exit_code != 0 and "--reason, --topic, --id or --all" in result.output


def test_a_truncated_copy_whose_source_is_gone_is_not_replayed(broker, tmp_path):
    from streams.deadletters import plan

    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    letter = DeadLetter(
        stage="generate",
        reason="oversized",
        error="too big",
        source_topic=CONCEPTS.full_name(kafka.namespace),
        partition=0,
        offset=10_000,  # never written
        payload_b64=base64.b64encode(b"{").decode(),
    )
    assert plan(kafka, broker.bootstrap_servers, letter).bytes_from == "dead_letter"
