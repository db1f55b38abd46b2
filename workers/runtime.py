"""The thin Faust layer: one app, one agent per stage, raw bytes in and out.

Each agent takes micro-batches (up to ``batch_size`` events or ``batch_within_s``), decodes them
(unreadable bytes go to the dead-letter topic with the reason and where they came from), runs the
stage's pure ``process`` in a worker thread so the event loop keeps heartbeating, and awaits the
broker's acknowledgement of every output before the input offsets are committed: at-least-once,
and ids are content hashes, so a redelivery reproduces the same records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust

from streams import metrics, serde
from streams.cluster import faust_credentials
from streams.records import Record
from streams.topics import DEAD_LETTERS, TopicSpec
from workers import monitoring
from workers.stage import Emit, Stage

if TYPE_CHECKING:
    from promptcot.settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, bootstrap: str, app_id: str) -> faust.App:
    kafka = settings.kafka
    datadir = Path(tempfile.gettempdir()) / "promptcot-faust" / app_id  # stateless: nothing to keep
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=";".join(f"kafka://{hp.strip()}" for hp in bootstrap.split(",")),
        broker_credentials=faust_credentials(kafka),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",  # stateless workers: no tables to restore (docs/broker.md: end offsets)
        datadir=str(datadir),
        web_enabled=False,
        topic_allow_declare=False,  # topics come from the catalogue (streams.topics.ensure_topics)
        processing_guarantee="at_least_once",  # exactly_once cannot start on Tansu
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_partitions=kafka.partitions,
        producer_acks=-1,
        stream_buffer_maxsize=256,
        # Stopping must not wait for a batch in a model call: at-least-once redelivers it.
        stream_wait_empty=False,
        # A model call can hold a batch for minutes on a CPU; don't let Faust declare it stuck.
        stream_processing_timeout=3600,
        broker_max_poll_interval=3600,
    )


class StageAgent:
    """Runs one stage inside a Faust app."""

    def __init__(
        self,
        app: faust.App,
        stage: Stage,
        settings: Settings,
        executor: ThreadPoolExecutor,
    ):
        self.app = app
        self.stage = stage
        self.settings = settings
        self.executor = executor
        ns = settings.kafka.namespace
        self._topics: dict[str, faust.TopicT] = {}
        for spec in (*stage.outputs, DEAD_LETTERS):
            self._topic(spec, ns)
        self.input_topic = self._topic(stage.input, ns)
        runtime = settings.stage(stage.name)
        self.batch_size = runtime.batch_size
        self.within = runtime.batch_within_s
        app.agent(self.input_topic, name=f"{ns}.{stage.name}", concurrency=runtime.concurrency)(
            self._run
        )
        if type(stage).start is not Stage.start:
            app.task(self._prime)

    def _topic(self, spec: TopicSpec, ns: str) -> faust.TopicT:
        name = spec.full_name(ns)
        if name not in self._topics:
            self._topics[name] = self.app.topic(
                name, key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw"
            )
        return self._topics[name]

    async def _prime(self) -> None:
        loop = asyncio.get_running_loop()
        emits = await loop.run_in_executor(self.executor, self._call, self.stage.start)
        await self._send(emits)

    def _call(self, fn: Any, *args: Any) -> Any:
        self.stage.ensure_ready()
        return fn(*args)

    async def _run(self, stream: faust.StreamT) -> None:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(self.batch_size, within=self.within):
            started = time.perf_counter()
            decoded: list[tuple[Record, Any]] = []
            dead: list[Emit] = []
            for event in events:
                try:
                    decoded.append(
                        (serde.decode(event.value, self.stage.input_type), event.message)
                    )
                except serde.RecordDecodeError as exc:
                    dead.append(self._dead_letter(exc, event.message))
            metrics.RECORDS_IN.labels(stage=self.stage.name).inc(len(events))
            emits = list(dead)
            if decoded:
                emits += await loop.run_in_executor(self.executor, self._process_safely, decoded)
            await self._send(emits)
            metrics.BATCH_SIZE.labels(stage=self.stage.name).observe(len(events))
            metrics.BATCH_SECONDS.labels(stage=self.stage.name).observe(
                time.perf_counter() - started
            )

    def _process_safely(self, decoded: list[tuple[Record, Any]]) -> list[Emit]:
        """process() must not raise; if it does anyway (a bug, a dead backend), retry record by
        record so one poison record cannot take its batch-mates with it, and dead-letter the
        records that still fail, with the exception as the reason."""
        try:
            return self._call(self.stage.process, [record for record, _ in decoded])
        except Exception:
            log.exception(
                "stage %s failed on a batch of %d; retrying one by one",
                self.stage.name,
                len(decoded),
            )
        emits: list[Emit] = []
        for record, msg in decoded:
            try:
                emits += self._call(self.stage.process, [record])
            except Exception as exc:
                log.exception("stage %s failed on record %s", self.stage.name, record.id)
                emits.append(self._dead_letter(exc, msg))
        return emits

    def _dead_letter(self, exc: Exception, msg: Any) -> Emit:
        record = serde.dead_letter(
            stage=self.stage.name,
            error=exc,
            topic=getattr(msg, "topic", self.stage.input.full_name(self.settings.kafka.namespace)),
            partition=getattr(msg, "partition", -1),
            offset=getattr(msg, "offset", -1),
            key=getattr(msg, "key", None),
            payload=getattr(msg, "value", None),
        )
        metrics.DEAD_LETTERS.labels(stage=self.stage.name, reason=record.reason).inc()
        return Emit(DEAD_LETTERS, record)

    async def _send(self, emits: list[Emit]) -> None:
        if not emits:
            return
        ns = self.settings.kafka.namespace
        futures = []
        for emit in emits:
            topic = self._topic(emit.topic, ns)
            key = str(getattr(emit.record, emit.topic.key, emit.record.id) or emit.record.id)
            fut = await topic.send(
                key=key.encode(), value=serde.encode(emit.record), headers=emit.record.headers()
            )
            futures.append(fut)
            metrics.RECORDS_OUT.labels(stage=self.stage.name, topic=emit.topic.name).inc()
        # Wait for the broker's acks before the input offsets may be committed.
        await asyncio.gather(*futures)


async def run_stages(
    settings: Settings,
    stages: list[Stage],
    bootstrap: str,
    *,
    app_id: str | None = None,
    until: Callable[[], Awaitable[None]] | None = None,
) -> list[Stage]:
    """Run ``stages`` in one Faust app until ``until()`` returns (default: forever).

    Each process joins one consumer group per app id; a single-stage worker gets its own group,
    so `promptcot worker generate` on ten machines splits the concept partitions ten ways.
    """
    group = app_id or f"{settings.kafka.consumer_group_prefix}-{'-'.join(s.name for s in stages)}"
    app = build_app(settings, bootstrap, group)
    # One thread per stage: stages overlap (filter embeds while verify solves); a model shared
    # by two roles serializes itself with its own lock.
    executor = ThreadPoolExecutor(max_workers=max(2, len(stages)), thread_name_prefix="stage")
    for stage in stages:
        StageAgent(app, stage, settings, executor)
    await app.start()
    monitor = asyncio.create_task(monitoring.monitor(settings, bootstrap, group, stages))
    try:
        if until is None:
            await asyncio.Event().wait()
        else:
            await until()
    finally:
        monitor.cancel()  # lag and health (workers/monitoring.py)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.stop(), timeout=30)
        executor.shutdown(wait=False, cancel_futures=True)
        for stage in stages:
            with contextlib.suppress(Exception):
                stage.close()
    return stages
