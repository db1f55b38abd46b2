"""Consumer lag per consumer group, topic and partition, right on the embedded broker too.

lag = true end offset - committed offset of the group (the log start when the group committed
nothing: workers read from the earliest offset). Tansu reports a wrong end offset, the first
offset of the partition's last batch + 1 (docs/broker.md): ten records produced in one batch at
offsets 0..9 report an end of 1. So the true end is found by reading forward from the reported
end until a fetch comes back empty: the rest of the last batch, plus whatever is produced
meanwhile (bounded by _READ_BUDGET_S); on a broker with correct end offsets and no producer
running, nothing.

``watch`` is the background task each worker process runs for its own group and input topics
(the runtime starts it); ``LagReader.read`` is the measurement, usable from tools and tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streams import metrics
from streams.cluster import kafka_python_config
from streams.settings import KafkaSettings
from streams.topics import TopicSpec

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_MS = 5000  # a refresh must not hang on a broker that went away
_READ_BUDGET_S = 2.0  # reading to the end of a partition that is being written stops here


@dataclass(frozen=True)
class PartitionLag:
    topic: str  # full topic name
    partition: int
    start: int  # log start offset: where a group that committed nothing begins
    end: int  # true end offset: the offset the next produced record gets
    committed: int | None  # the group's committed offset; None if it committed nothing

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.start if self.committed is None else self.committed))


class LagReader:
    """Reads end offsets and a group's committed offsets with its own clients: no consumer group
    of its own (it never joins or commits), so it cannot disturb the workers' groups."""

    def __init__(self, kafka: KafkaSettings, bootstrap: str):
        config = kafka_python_config(kafka, bootstrap)
        self._consumer = KafkaConsumer(
            **config,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            request_timeout_ms=_REQUEST_TIMEOUT_MS + 1000,  # must exceed fetch_max_wait_ms
        )
        try:
            self._admin = KafkaAdminClient(**config, request_timeout_ms=_REQUEST_TIMEOUT_MS)
        except BaseException:
            self._consumer.close()
            raise

    def read(self, group: str, topics: list[str]) -> list[PartitionLag]:
        """Lag of ``group`` on every partition of ``topics`` (full names)."""
        tps = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(self._consumer.partitions_for_topic(topic) or ())
        ]
        if not tps:
            return []
        ends = self.true_end_offsets(tps)
        starts = self._consumer.beginning_offsets(tps)
        offsets = self._admin.list_group_offsets({group: tps}).get(group, {})
        out = []
        for tp in tps:
            meta = offsets.get(tp)
            committed = meta.offset if meta is not None and meta.offset >= 0 else None
            out.append(PartitionLag(tp.topic, tp.partition, starts[tp], ends[tp], committed))
        return out

    def true_end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset after the last record of each partition: the reported end, then read
        forward from it until a fetch comes back empty."""
        ends = dict(self._consumer.end_offsets(tps))
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, ends[tp])
        deadline = time.monotonic() + _READ_BUDGET_S
        while time.monotonic() < deadline:
            batch = self._consumer.poll(timeout_ms=200)
            if not batch:
                break
            for tp, messages in batch.items():
                ends[tp] = max(ends[tp], messages[-1].offset + 1)
        return ends

    def close(self) -> None:
        self._consumer.close()
        self._admin.close()


async def watch(
    kafka: KafkaSettings,
    bootstrap: str,
    group: str,
    inputs: Mapping[str, TopicSpec],
    interval_s: float,
) -> None:
    """Set ``promptcot_consumer_lag`` for ``group`` and each stage's input topic every
    ``interval_s`` until cancelled. A failed refresh is logged and retried at the next tick:
    a worker never stops over its own monitoring."""
    if interval_s <= 0 or not inputs:
        return
    ns = kafka.namespace
    stages_by_topic: dict[str, list[tuple[str, str]]] = {}
    for stage, spec in inputs.items():
        stages_by_topic.setdefault(spec.full_name(ns), []).append((stage, spec.name))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lag")  # clients: one thread
    loop = asyncio.get_running_loop()
    reader: LagReader | None = None
    try:
        while True:
            try:
                if reader is None:
                    reader = await loop.run_in_executor(executor, LagReader, kafka, bootstrap)
                lags = await loop.run_in_executor(
                    executor, reader.read, group, list(stages_by_topic)
                )
            except Exception as exc:  # noqa: BLE001 - monitoring must not take the worker down
                log.warning("consumer lag of %s not measured: %s", group, exc)
            else:
                for item in lags:
                    for stage, short in stages_by_topic[item.topic]:
                        metrics.CONSUMER_LAG.labels(
                            group=group, stage=stage, topic=short, partition=str(item.partition)
                        ).set(item.lag)
            await asyncio.sleep(interval_s)
    finally:
        if reader is not None:
            executor.submit(reader.close)
        executor.shutdown(wait=False)
