"""Broker throughput: the durable embedded broker (Tansu's s3:// engine on the local S3 server)
vs the in-memory one, produce and consume, with kafka-python and aiokafka.

    .venv/bin/python -m bench --case broker [--quick]

Both brokers run at once and every round measures all eight cells back to back, so machine load
hits them alike; figures are the median of the rounds with their spread ([min, max]), and the
durable/memory ratio of each cell, round by round. Records are 1 KB (a concept set or verdict
is 0.5-4 KB), produced with acks=all to a fresh 2-partition topic, then read back from the
beginning without a consumer group.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from bench.harness import Row, ratios, timing
from streams.broker import EmbeddedBroker

CASE = "broker"
PAYLOAD = b"x" * 1024
# The factory writes well under 100 records/s on a 2-core machine (a model call per record):
# a broker 10x past that is never the bottleneck.
GOAL_MSG_S = 1_000.0


def _topic(bootstrap: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, 2, 1)])
    admin.close()
    return name


def kp_produce(bootstrap: str, topic: str, n: int) -> float:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    started = time.perf_counter()
    for _ in range(n):
        producer.send(topic, PAYLOAD)
    producer.flush()
    elapsed = time.perf_counter() - started
    producer.close()
    return n / elapsed


def kp_consume(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, p) for p in (0, 1)])
    consumer.seek_to_beginning()
    started, seen = time.perf_counter(), 0
    while seen < n:
        seen += sum(len(v) for v in consumer.poll(timeout_ms=1000).values())
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


async def _aio_produce(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    started = time.perf_counter()
    futures = [await producer.send(topic, PAYLOAD) for _ in range(n)]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return n / elapsed


async def _aio_consume(bootstrap: str, topic: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as AioTP

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    partitions = [AioTP(topic, p) for p in (0, 1)]
    consumer.assign(partitions)
    await consumer.seek_to_beginning(*partitions)
    started, seen = time.perf_counter(), 0
    while seen < n:
        batch = await consumer.getmany(timeout_ms=1000)
        seen += sum(len(v) for v in batch.values())
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return n / elapsed


def aio_produce(bootstrap: str, topic: str, n: int) -> float:
    return asyncio.run(_aio_produce(bootstrap, topic, n))


def aio_consume(bootstrap: str, topic: str, n: int) -> float:
    return asyncio.run(_aio_consume(bootstrap, topic, n))


CLIENTS: dict[str, tuple[Callable, Callable]] = {
    "kafka-python": (kp_produce, kp_consume),
    "aiokafka": (aio_produce, aio_consume),
}


def measure(quick: bool = False) -> list[Row]:
    """Per broker, client and direction: msg/s, median of the rounds with their spread; then
    the durable/memory ratio of each client and direction, round by round."""
    n, rounds = (5_000, 3) if quick else (20_000, 3)
    samples: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        brokers = {
            "memory": EmbeddedBroker(),
            "durable": EmbeddedBroker(data_dir=Path(tmp) / "broker"),
        }
        try:
            for broker in brokers.values():
                broker.start()
            for _ in range(rounds):
                for storage, broker in brokers.items():
                    for client, (produce, consume) in CLIENTS.items():
                        topic = _topic(broker.bootstrap_servers)
                        for direction, fn in (("produce", produce), ("consume", consume)):
                            rate = fn(broker.bootstrap_servers, topic, n)
                            samples.setdefault((storage, client, direction), []).append(rate)
        finally:
            for broker in brokers.values():
                broker.stop()
    rows = [
        timing(CASE, f"{storage} {client} {direction} ({n:,} x 1 KB)", rates, "msg/s", GOAL_MSG_S)
        for (storage, client, direction), rates in samples.items()
    ]
    for client in CLIENTS:
        for direction in ("produce", "consume"):
            durable = samples[("durable", client, direction)]
            memory = samples[("memory", client, direction)]
            rows.append(
                timing(CASE, f"durable/memory {client} {direction}", ratios(durable, memory), "x")
            )
    return rows


if __name__ == "__main__":
    for r in measure():
        low, high = r["spread"]
        print(f"{r['name']:<46} {r['value']:>12,.2f} {r['unit']:<6} [{low:,.2f} .. {high:,.2f}]")
