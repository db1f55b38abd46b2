"""The Faust side of the stage runtime: the app, and one agent per stage that reads its input,
hands it to the stage's chunk pipeline (workers/pipeline.py), sends what comes back and
acknowledges the input in offset order (workers/offsets.py).

Per stage, one Faust agent reads micro-batches (up to ``batch_size`` records or
``batch_within_s``) without Faust's automatic acknowledgement and hands them on in chunks: a
model stage whose backend serves concurrent calls together (an OpenAI-compatible server, vLLM)
gets one record per chunk and up to ``in_flight`` chunks at once, so the engine's batch stays
full and each record moves on as soon as its own completion is back; a stage on the in-process
transformers backend gets whole micro-batches, one at a time. Each chunk's outputs are computed
once in the stage's thread (the event loop keeps heartbeating), then sent; a chunk that cannot
finish (a broker away, a journal disk full) is retried with backoff (workers/backoff.py) with
the same outputs, never by processing again. When every send is acknowledged by the broker,
the chunk's input messages are finished.

The work per micro-batch is in ``_run``, per chunk in ``_handle``, per output record in
``_send`` (one producer call and the record's metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust

from streams import metrics
from streams.cluster import faust_credentials
from streams.topics import CATALOGUE, TopicSpec
from workers.backoff import Backoff, keep_trying
from workers.offsets import OffsetLedger
from workers.pipeline import ChunkPipeline, Outgoing
from workers.stage import Stage

if TYPE_CHECKING:
    from streams.settings import KafkaSettings
    from workers.settings import StageRuntime, WorkerSettings

log = logging.getLogger(__name__)


def build_app(kafka: KafkaSettings, bootstrap: str, app_id: str) -> faust.App:
    datadir = Path(tempfile.gettempdir()) / "promptcot-faust" / app_id  # stateless: nothing kept
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=";".join(f"kafka://{hp.strip()}" for hp in bootstrap.split(",")),
        broker_credentials=faust_credentials(kafka),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",  # stateless workers: no tables to restore (docs/broker.md)
        datadir=str(datadir),
        web_enabled=False,
        topic_allow_declare=False,  # topics come from the catalogue (streams.topics)
        processing_guarantee="at_least_once",  # exactly_once cannot start on Tansu
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_partitions=kafka.partitions,
        producer_acks=-1,
        producer_max_request_size=kafka.max_record_bytes + 64 * 1024,  # headers and framing
        stream_buffer_maxsize=256,
        # Stopping never waits on Faust's side: the runtime drains its own work first.
        stream_wait_empty=False,
        # A model call can hold a record for minutes on a CPU; don't let Faust call it stuck.
        stream_processing_timeout=3600,
        broker_max_poll_interval=3600,
    )


class StageAgent:
    """Runs one stage inside a Faust app."""

    def __init__(
        self,
        app: faust.App,
        stage: Stage,
        runtime: StageRuntime,
        worker: WorkerSettings,
        kafka: KafkaSettings,
    ):
        self.app = app
        self.stage = stage
        self.runtime = runtime
        self.worker = worker
        self.namespace = kafka.namespace
        self.chunk_size = stage.chunk_size(runtime.batch_size)
        self.in_flight = max(
            self.chunk_size,
            runtime.in_flight or stage.default_in_flight(runtime.batch_size),
        )
        # Threads that run process(): one (calls in order, never two at once) unless the stage
        # says its process may run concurrently (a continuous-batching model server).
        workers = math.ceil(self.in_flight / self.chunk_size) if stage.concurrent() else 1
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"stage-{stage.name}")
        self.stopping = threading.Event()
        self.pipeline = ChunkPipeline(stage, runtime, worker, kafka, self.stopping)
        self.ledger = OffsetLedger()
        self._capacity = self.in_flight
        self._capacity_changed = asyncio.Condition()
        self.tasks: set[asyncio.Task] = set()
        self._topics: dict[str, faust.TopicT] = {}
        self.input_topic = self._topic(stage.input)
        app.agent(self.input_topic, name=f"{self.namespace}.{stage.name}")(self._run)
        if type(stage).start is not Stage.start:
            app.task(self._prime)

    def _topic(self, spec: TopicSpec) -> faust.TopicT:
        name = spec.full_name(self.namespace)
        if name not in self._topics:
            self._topics[name] = self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                value_serializer="raw",
                key_serializer="raw",
            )
        return self._topics[name]

    async def _prime(self) -> None:
        loop = asyncio.get_running_loop()
        emits = await loop.run_in_executor(self.executor, self.stage.start)
        outgoing = self.pipeline.start_outputs(emits)

        def failed(exc: Exception, delay: float) -> None:
            log.error(
                "stage %s: its start records could not be sent; retrying",
                self.stage.name,
                exc_info=exc,
            )
            metrics.RETRIES.labels(stage=self.stage.name, kind="runtime").inc()

        if not self.stopping.is_set():  # start() changed the stage's state: send, never redo
            await keep_trying(
                lambda: self._send(outgoing), Backoff.of(self.worker), self.stopping, failed
            )

    # -- per micro-batch -----------------------------------------------------------------------

    async def _run(self, stream: faust.StreamT) -> None:
        name = self.stage.name
        async for events in stream.noack_take(
            self.runtime.batch_size, within=self.runtime.batch_within_s
        ):
            if self.stopping.is_set():
                continue  # never acknowledged: redelivered to the next worker
            metrics.RECORDS_IN.labels(stage=name).inc(len(events))
            for event in events:
                self.ledger.add(event)
            metrics.PENDING.labels(stage=name).set(self.ledger.pending)
            for start in range(0, len(events), self.chunk_size):
                chunk = events[start : start + self.chunk_size]
                await self._reserve(len(chunk))
                if self.stopping.is_set():
                    await self._release(len(chunk))
                    break
                task = asyncio.create_task(self._handle(chunk))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _reserve(self, n: int) -> None:
        async with self._capacity_changed:
            await self._capacity_changed.wait_for(
                lambda: self._capacity >= n or self.stopping.is_set()
            )
            self._capacity -= n

    async def _release(self, n: int) -> None:
        async with self._capacity_changed:
            self._capacity += n
            self._capacity_changed.notify_all()

    # -- per chunk -----------------------------------------------------------------------------

    async def _handle(self, events: list[Any]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        outgoing: list[Outgoing] | None = None

        async def finish() -> None:
            nonlocal outgoing
            if outgoing is None:  # computed once: process() may change a stage's state
                outgoing = await loop.run_in_executor(self.executor, self.pipeline.outputs, events)
            await self._send(outgoing)

        def failed(exc: Exception, delay: float) -> None:
            log.error(
                "stage %s: a chunk of %d could not finish; retrying in %.0f s",
                self.stage.name,
                len(events),
                delay,
                exc_info=exc,
            )
            metrics.RETRIES.labels(stage=self.stage.name, kind="runtime").inc()

        try:  # a broker that is away, a journal disk that is full: wait and retry
            if not await keep_trying(finish, Backoff.of(self.worker), self.stopping, failed):
                return  # not finished: never acknowledged, redelivered
        except asyncio.CancelledError:
            return  # not finished: never acknowledged, redelivered
        finally:
            await self._release(len(events))
        for event in self.ledger.finish(events):
            event.ack()
        name = self.stage.name
        metrics.PENDING.labels(stage=name).set(self.ledger.pending)
        metrics.LAST_PROGRESS.labels(stage=name).set(time.time())
        metrics.BATCH_SIZE.labels(stage=name).observe(len(events))
        metrics.BATCH_SECONDS.labels(stage=name).observe(time.perf_counter() - started)

    # -- per output record ---------------------------------------------------------------------

    async def _send(self, outgoing: list[Outgoing]) -> None:
        """Send and wait for the broker's acknowledgement of every record. Straight to the
        producer: Faust's topic.send layers cost more than the send itself (docs/runtime.md)."""
        if not outgoing:
            return
        producer = self.app.producer
        futures = [
            await producer.send(
                CATALOGUE[o.topic].full_name(self.namespace),
                o.key,
                o.value,
                None,
                None,
                [(k, v.encode()) for k, v in o.headers.items()],
            )
            for o in outgoing
        ]
        await asyncio.gather(*futures)
        for o in outgoing:
            metrics.RECORDS_OUT.labels(stage=self.stage.name, topic=o.topic).inc()
            if o.dead_letter_reason:
                metrics.DEAD_LETTERS.labels(
                    stage=self.stage.name, reason=o.dead_letter_reason
                ).inc()

    # -- stopping ------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> int:
        """Stop taking input; give records in process ``grace_s`` to finish. Returns how many
        records were still unfinished (they are redelivered)."""
        self.stopping.set()
        async with self._capacity_changed:
            self._capacity_changed.notify_all()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=grace_s)
        return self.ledger.pending

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.stage.close()
        self.pipeline.close()
