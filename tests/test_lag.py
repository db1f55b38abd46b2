"""Consumer lag (streams/lag.py) against the real embedded broker, whose reported end offset is
wrong when several records share a batch (docs/broker.md): produce N, commit M, the lag must be
N - M on every partition; and a worker run by the runtime reports its own group's lag."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.structs import OffsetAndMetadata

from promptcot.settings import load_settings
from streams import lag, metrics
from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.health import HEALTH
from streams.records import SeedProblem
from streams.settings import KafkaSettings
from streams.topics import SEEDS, ensure_topics
from workers.runtime import run_stages
from workers.stage import Stage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as b:
        yield b


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"lag-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()
    return name


def _produce(bootstrap: str, topic: str, partition: int, n: int, *, one_batch: bool) -> None:
    """``n`` records; in one producer batch, or each flushed on its own."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=500, batch_size=1 << 20)
    for i in range(n):
        producer.send(topic, f"r{i}".encode(), partition=partition)
        if not one_batch:
            producer.flush()
    producer.flush()
    producer.close()


def _commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    consumer.assign(list(offsets))  # assign, not subscribe: no group join to wait for
    consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
    consumer.close()


def test_lag_is_produced_minus_committed_even_where_the_reported_end_is_wrong(broker):
    bs = broker.bootstrap_servers
    topic = _topic(bs, 2)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    _produce(bs, topic, 0, 10, one_batch=True)
    _produce(bs, topic, 1, 7, one_batch=False)
    probe = KafkaConsumer(bootstrap_servers=bs)
    reported = probe.end_offsets([p0, p1])
    probe.close()
    assert reported[p0] < 10, "the broker's end offset is right here: this case proves nothing"

    reader = lag.LagReader(KafkaSettings(), bs)
    try:
        fresh = {(x.partition): x for x in reader.read(f"g-{uuid.uuid4().hex[:6]}", [topic])}
        assert {p: x.lag for p, x in fresh.items()} == {0: 10, 1: 7}  # nothing committed
        assert fresh[0].committed is None

        group = f"g-{uuid.uuid4().hex[:6]}"
        _commit(bs, group, {p0: 4, p1: 7})
        got = {x.partition: x for x in reader.read(group, [topic])}
        assert {p: (x.end, x.committed, x.lag) for p, x in got.items()} == {
            0: (10, 4, 6),
            1: (7, 7, 0),
        }

        _produce(bs, topic, 1, 3, one_batch=True)  # more work arrives after the commit
        assert {x.partition: x.lag for x in reader.read(group, [topic])} == {0: 6, 1: 3}
    finally:
        reader.close()


def _lag_gauge(group: str, stage: str) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value
        for family in metrics.CONSUMER_LAG.collect()
        for s in family.samples
        if s.labels["group"] == group and s.labels["stage"] == stage
    }


def test_watch_sets_the_gauge_per_stage_topic_and_partition(broker):
    bs = broker.bootstrap_servers
    ns = f"w{uuid.uuid4().hex[:6]}"
    kafka = KafkaSettings(bootstrap_servers=bs, namespace=ns, partitions=2)
    ensure_topics(kafka_python_config(kafka, bs), ns, 2, 1)
    full = SEEDS.full_name(ns)
    _produce(bs, full, 0, 5, one_batch=True)
    _produce(bs, full, 1, 2, one_batch=True)
    group = f"g-{uuid.uuid4().hex[:6]}"
    _commit(bs, group, {TopicPartition(full, 0): 1})

    async def run() -> dict[str, float]:
        task = asyncio.create_task(lag.watch(kafka, bs, group, {"annotate": SEEDS}, 0.2))
        try:
            while len(_lag_gauge(group, "annotate")) < 2:
                assert not task.done(), task
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
        return _lag_gauge(group, "annotate")

    assert asyncio.run(asyncio.wait_for(run(), timeout=60)) == {"0": 4.0, "1": 2.0}


class _Drain(Stage[SeedProblem]):
    """Consumes seeds and emits nothing (``sink`` only picks the registered batching)."""

    name = "sink"
    input = SEEDS
    outputs = ()

    def process(self, records):
        return []


def test_a_worker_reports_its_groups_lag_and_readiness_while_it_runs(broker):
    bs = broker.bootstrap_servers
    ns = f"r{uuid.uuid4().hex[:6]}"
    settings = load_settings(
        kafka={"bootstrap_servers": bs, "namespace": ns},
        metrics={"port": 0, "lag_interval_s": 0.3},
    )
    ensure_topics(kafka_python_config(settings.kafka, bs), ns, settings.kafka.partitions, 1)
    seeds = [
        SeedProblem(source="t", source_id=str(i), domain="math", text=f"What is {i}+{i}?")
        for i in range(12)
    ]
    assert publish(settings.kafka, bs, SEEDS, seeds) == 12
    group = f"promptcot-lag-{uuid.uuid4().hex[:6]}"
    seen_ready: list[bool] = []

    async def until() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen_ready.append(HEALTH.ready()[0])
            gauge = _lag_gauge(group, "sink")
            if len(gauge) == settings.kafka.partitions and sum(gauge.values()) == 0:
                return
            await asyncio.sleep(0.2)

    asyncio.run(run_stages(settings, [_Drain(settings)], bs, app_id=group, until=until))
    gauge = _lag_gauge(group, "sink")
    assert len(gauge) == settings.kafka.partitions and sum(gauge.values()) == 0, gauge
    assert seen_ready[-1], "not ready while the stages ran"  # the first look may precede start
    assert HEALTH.ready() == (False, "stopping")


def test_a_lag_reader_whose_admin_client_fails_closes_its_consumer(broker, monkeypatch):
    from kafka.errors import KafkaConnectionError

    consumers: list[KafkaConsumer] = []

    class Recorded(KafkaConsumer):
        def __init__(self, **config):
            super().__init__(**config)
            consumers.append(self)

    def no_admin(**config):
        raise KafkaConnectionError("no broker answers")

    monkeypatch.setattr(lag, "KafkaConsumer", Recorded)
    monkeypatch.setattr(lag, "KafkaAdminClient", no_admin)
    with pytest.raises(KafkaConnectionError):
        lag.LagReader(KafkaSettings(), broker.bootstrap_servers)
    [consumer] = consumers
    assert consumer._closed
