"""`promptcot dlq` through the real broker: dead letters counted by source topic and reason, one
shown (JSON or hex), and a selection replayed to its source topic with the original bytes and
headers (read back at the dead letter's coordinates; the dead letter's copy only if those are
gone and it is whole), each source record only once, however many stages dead-lettered it."""

from __future__ import annotations

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
from streams.topics import CONCEPTS, DEAD_LETTERS, VERDICTS, ensure_topics

runner = CliRunner()
BIG = json.dumps({"id": "cset_x", "concepts": ["a" * 50_000]}).encode()


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as b:
        yield b


def _send(settings, topic_spec, payload: bytes):
    """``payload`` on the source topic; its (topic, partition, offset)."""
    kafka = settings.kafka
    producer = KafkaProducer(**kafka_python_config(kafka, kafka.bootstrap_servers))
    topic = topic_spec.full_name(kafka.namespace)
    meta = producer.send(topic, payload, key=b"k", headers=[("x-record-kind", b"t")]).get(10)
    producer.close()
    return topic, meta.partition, meta.offset


def _dead(settings, where, payload: bytes, reason: str, stage="generate", max_bytes=1_000_000):
    """The dead letter a stage writes for the record at ``where`` (as the runtime does)."""
    topic, partition, offset = where
    letter = serde.dead_letter(
        stage=stage,
        error=serde.RecordDecodeError(reason, "bad"),
        topic=topic,
        partition=partition,
        offset=offset,
        key=b"k",
        payload=payload,
        max_bytes=max_bytes,
    )
    publish(settings.kafka, settings.kafka.bootstrap_servers, DEAD_LETTERS, [letter])
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


def test_counts_show_and_replay_each_source_record_once(broker, tmp_path):
    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    bad = b"\xff\xfe not json"
    garbage = _dead(settings, _send(settings, CONCEPTS, bad), bad, serde.UNDECODABLE)
    big = _dead(settings, _send(settings, CONCEPTS, BIG), BIG, "record_too_large", max_bytes=12_000)
    assert big.payload_truncated and big.payload_size == len(BIG)
    future = b'{"schema_version": 99}'
    where = _send(settings, VERDICTS, future)
    # Three stages read verdicts; two of them dead-lettered this record.
    verdict = _dead(settings, where, future, "schema_version_unsupported", stage="sampler")
    _dead(settings, where, future, "schema_version_unsupported", stage="sink")

    counts = _cli(settings, "dlq", "counts")
    ns = kafka.namespace
    assert "4 dead letters of 3 source records, 0 replayed" in counts
    rows = {tuple(c.strip() for c in line.split("│")[1:4]) for line in counts.splitlines()}
    assert (f"{ns}.concepts", "undecodable", "1") in rows
    assert (f"{ns}.verdicts", "schema_version_unsupported", "2") in rows

    shown = _cli(settings, "dlq", "show", garbage.id)
    assert "ff fe 20 6e 6f 74" in shown and garbage.source_topic in shown
    assert '"schema_version": 99' in _cli(settings, "dlq", "show", verdict.id)
    shown = _cli(settings, "dlq", "show", big.id)
    assert f"of {len(BIG):,} bytes" in shown and 'start of the text):\n{"id": "cset_x"' in shown

    # Replay what came from the concepts topic: both originals, bytes and headers, come back
    # from the source topic (the big one's dead letter holds only its start).
    out = _cli(settings, "dlq", "replay", "--topic", "concepts")
    assert "replayed 2 records; 0 replayed before" in out
    assert f"{len(BIG):,} bytes from the source topic" in out
    replayed = [(v, h) for v, h in _source_values(settings, CONCEPTS) if "x-replay-of" in h]
    assert sorted(v for v, _ in replayed) == sorted([bad, BIG])
    assert {h["x-replay-of"].decode() for _, h in replayed} == {garbage.id, big.id}
    assert all(h["x-record-kind"] == b"t" for _, h in replayed)  # original headers kept

    # Nothing replays twice: again by reason, then everything; the verdict goes back once.
    out = _cli(settings, "dlq", "replay", "--reason", "undecodable")
    assert "replayed 0 records; 1 replayed before" in out
    assert "replayed 1 records; 2 replayed before" in _cli(settings, "dlq", "replay", "--all")
    assert [
        h["x-replay-of"].count(b",")
        for _, h in _source_values(settings, VERDICTS)
        if "x-replay-of" in h
    ] == [1]
    assert "4 dead letters of 3 source records, 3 replayed" in _cli(settings, "dlq", "counts")


def test_replay_needs_a_selection(broker, tmp_path):
    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    env = {"PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
    result = runner.invoke(app, ["dlq", "replay"], env=env)
    assert result.exit_code != 0 and "--reason, --topic, --id or --all" in result.output


def test_when_the_source_is_gone_only_a_whole_copy_is_replayed(broker, tmp_path):
    from streams.deadletters import plans

    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    gone = (CONCEPTS.full_name(kafka.namespace), 0, 10_000)  # an offset never written
    whole = _dead(settings, gone, b"{", serde.UNDECODABLE)
    [p], [] = plans(kafka, broker.bootstrap_servers, [whole])
    assert (p.payload, p.bytes_from) == (b"{", "dead_letter")
    cut = _dead(settings, gone, BIG, "record_too_large", max_bytes=12_000)
    [], [unsent] = plans(kafka, broker.bootstrap_servers, [cut])
    assert unsent.letters == [cut] and "is gone; not replayed" in unsent.why


def _send_big(settings, topic_spec, payload: bytes):
    """Like _send, for a record over kafka-python's 1 MB default: the broker takes it, as it
    takes one a stage wrote with ``kafka.max_record_bytes`` raised."""
    kafka = settings.kafka
    config = kafka_python_config(kafka, kafka.bootstrap_servers)
    producer = KafkaProducer(**config, max_request_size=8 << 20)
    topic = topic_spec.full_name(kafka.namespace)
    meta = producer.send(topic, payload, key=b"k").get(30)
    producer.close()
    return topic, meta.partition, meta.offset


def _replayed(settings, spec) -> list[bytes]:
    return [v for v, h in _source_values(settings, spec) if "x-replay-of" in h]


def test_a_record_the_producer_cannot_send_is_reported_and_the_others_replayed(broker, tmp_path):
    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    huge = json.dumps({"id": "cset_huge", "concepts": ["h" * 1_200_000]}).encode()
    too_large = _dead(
        settings, _send_big(settings, CONCEPTS, huge), huge, "record_too_large", max_bytes=12_000
    )
    small = [b'{"n": %d}' % i for i in range(2)]
    for payload in small:
        _dead(settings, _send(settings, CONCEPTS, payload), payload, "record_too_large")

    env = {"PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers}
    env |= {"PROMPTCOT_KAFKA__NAMESPACE": kafka.namespace, "COLUMNS": "200"}
    result = runner.invoke(app, ["dlq", "replay", "--topic", "concepts"], env=env)
    assert result.exit_code == 1, result.output  # not everything chosen went back
    assert "replayed 2 records; 0 replayed before; 1 not sent" in result.output
    assert f"not sent {too_large.source_topic}[{too_large.partition}]@{too_large.offset}" in (
        " ".join(result.output.split())
    )
    assert f"too large: {len(huge):,} bytes" in result.output
    assert "kafka.max_record_bytes" in result.output
    assert sorted(_replayed(settings, CONCEPTS)) == sorted(small)

    # With the limit raised, as the stage that wrote it had, the huge one goes back too, once.
    env["PROMPTCOT_KAFKA__MAX_RECORD_BYTES"] = "2000000"
    out = runner.invoke(app, ["dlq", "replay", "--topic", "concepts"], env=env).output
    assert "replayed 1 records; 2 replayed before" in out, out
    assert sorted(_replayed(settings, CONCEPTS)) == sorted([*small, huge])


def test_a_record_that_fails_again_after_a_replay_is_replayed_again_only_when_asked(
    broker, tmp_path
):
    from streams.deadletters import replays

    settings = factory_settings(tmp_path, broker.bootstrap_servers, tmp_path)
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    payload = b'{"schema_version": 99}'
    reason = "schema_version_unsupported"
    _dead(settings, _send(settings, CONCEPTS, payload), payload, reason)
    assert "replayed 1 records; 0 replayed before" in _cli(
        settings, "dlq", "replay", "--reason", reason
    )

    # The fix did not help: the stage dead-letters the replayed copy (a new source record).
    [copy] = replays(kafka, broker.bootstrap_servers).values()
    where = (copy.source_topic, copy.replayed_partition, copy.replayed_offset)
    _dead(settings, where, payload, reason)
    out = _cli(settings, "dlq", "replay", "--reason", reason)
    assert "replayed 0 records; 1 replayed before; 1 failed again after a replay" in out
    assert "--again" in out
    assert len(_replayed(settings, CONCEPTS)) == 1
    assert "1 failed again after a replay" in _cli(settings, "dlq", "counts")

    out = _cli(settings, "dlq", "replay", "--reason", reason, "--again")
    assert "replayed 1 records; 1 replayed before" in out
    assert _replayed(settings, CONCEPTS) == [payload, payload]
    out = _cli(settings, "dlq", "replay", "--reason", reason, "--again")
    assert "replayed 0 records; 2 replayed before" in out  # each copy still goes back once
