"""The thin Faust layer that runs stages, and owns their offset commits.

Per stage, one Faust agent reads micro-batches (up to ``batch_size`` records or
``batch_within_s``) without Faust's automatic acknowledgement and hands them on in chunks: a
model stage whose backend serves concurrent calls together (an OpenAI-compatible server, vLLM)
gets one record per chunk and up to ``in_flight`` chunks at once, so the engine's batch stays
full and each record moves on as soon as its own completion is back; a stage on the in-process
transformers backend gets whole micro-batches, one at a time. Each chunk:

1. is decoded; bytes that can't be read (not JSON, wrong schema, a newer schema version, over
   ``kafka.max_record_bytes``) become dead letters with the reason and their coordinates;
2. is looked up in the stage's journal (workers/journal.py): an input decided before is
   answered with the recorded outputs, never decided again;
3. runs the stage's ``process`` in a worker thread (the event loop keeps heartbeating). A
   transient failure (a model server down, a full disk) is retried with backoff until it works
   or the worker stops; any other exception is retried record by record (the window, for the
   trainer) and the records that keep failing become dead letters with the error;
4. has its outputs recorded in the journal, then sent (a failed send is retried with the same
   outputs, never by processing again); when every send is acknowledged by the broker, its
   input messages are finished.

Acknowledgement to Faust follows offset order per partition (``OffsetLedger``): a message is
acknowledged only when it and every message before it on its partition are finished, so the
committed offset never passes a record whose outputs are not on the broker — whatever Faust
does on cancellation, and whatever order chunks finish in. On shutdown the agents stop taking
input, records in process get ``worker.shutdown_grace_s`` to finish, the finished prefix is
committed, and the rest is redelivered to the next worker (docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust

from streams import metrics, serde
from streams.cluster import faust_credentials
from streams.records import Record
from streams.topics import CATALOGUE, DEAD_LETTERS, TopicSpec
from workers import monitoring
from workers.journal import Journal
from workers.stage import Emit, Stage

if TYPE_CHECKING:
    from promptcot.settings import Settings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A stage could not set up (a missing model, an unwritable folder): the process refuses to
    start instead of dead-lettering every record it reads."""


# OS errors that a retry cannot fix (a path that is a file, missing or read-only): the attempt
# fails every time, so it goes the way of any failing record (retried, then dead-lettered).
_PERMANENT_ERRNOS = {
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
}


def is_transient(exc: BaseException) -> bool:
    """Failures of the process's surroundings, not of a record: retried, never dead-lettered.
    The math-verify worker not starting in time is one (a busy host: docs/verification.md)."""
    from llm.backends.base import BackendTimeoutError, UnreachableError
    from verification.mathcheck.oracle import WorkerStartError

    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, UnreachableError | BackendTimeoutError | WorkerStartError | OSError)


def build_app(settings: Settings, bootstrap: str, app_id: str) -> faust.App:
    kafka = settings.kafka
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


# --- offsets ----------------------------------------------------------------------------------


class OffsetLedger:
    """Per partition, the messages received in offset order and which of them are finished.
    ``finish`` returns the events that may now be acknowledged: the finished prefix of each
    partition, in order. An unfinished message holds back every message after it."""

    def __init__(self) -> None:
        self._queues: dict[Any, deque[list]] = {}
        self.pending = 0

    def add(self, event: Any) -> None:
        self._queues.setdefault(event.message.tp, deque()).append([event, False])
        self.pending += 1

    def finish(self, events: list[Any]) -> list[Any]:
        ids = {id(e) for e in events}
        touched = {e.message.tp for e in events}
        ready = []
        for tp in touched:
            queue = self._queues.get(tp)
            if not queue:
                continue
            for entry in queue:
                if id(entry[0]) in ids:
                    entry[1] = True
            while queue and queue[0][1]:
                ready.append(queue.popleft()[0])
        self.pending -= len(ready)
        return ready


# --- one stage ----------------------------------------------------------------------------------


class _Stopped(Exception):
    """The worker is stopping: abandon this chunk (it will be redelivered)."""


@dataclass
class _Item:
    record: Record
    message: Any


@dataclass
class _Outcome:
    """What a chunk produced, encoded: outputs per input id (journaled), and outputs of no
    single input."""

    by_input: dict[str, list[Outgoing]] = field(default_factory=dict)
    loose: list[Outgoing] = field(default_factory=list)


class UnusableOutput(ValueError):
    """An output that cannot become a record on its topic (the wrong type, not encodable, over
    the size limit): the failure of the input that produced it. ``reason`` is the dead letter's."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Outgoing:
    """One output, encoded once: what is sent, and what the journal keeps."""

    topic: str  # catalogue short name
    key: bytes
    value: bytes
    headers: dict[str, str]
    dead_letter_reason: str | None = None

    def journal_entry(self) -> list:
        return [self.topic, self.key.decode(), self.value.decode(), self.headers]

    @classmethod
    def from_journal(cls, entry: list) -> Outgoing:
        topic, key, value, headers = entry
        return cls(topic, key.encode(), value.encode(), headers)


class StageAgent:
    """Runs one stage inside a Faust app."""

    def __init__(self, app: faust.App, stage: Stage, settings: Settings):
        self.app = app
        self.stage = stage
        self.settings = settings
        self.runtime = settings.stage(stage.name)
        self.max_bytes = settings.kafka.max_record_bytes
        self.chunk_size = stage.chunk_size(self.runtime.batch_size)
        self.in_flight = max(
            self.chunk_size,
            self.runtime.in_flight or stage.default_in_flight(self.runtime.batch_size),
        )
        # Threads that run process(): one (calls in order, never two at once) unless the stage
        # says its process may run concurrently (a continuous-batching model server).
        workers = math.ceil(self.in_flight / self.chunk_size) if stage.concurrent() else 1
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix=f"stage-{stage.name}")
        ns = settings.kafka.namespace
        self.journal = (
            Journal(
                settings.worker.journal_dir / ns / f"{stage.name}.sqlite",
                settings.worker.journal_retention_days * 86400,
            )
            if stage.journaled
            else None
        )
        self.ledger = OffsetLedger()
        self.stopping = threading.Event()
        self._capacity = self.in_flight
        self._capacity_changed = asyncio.Condition()
        self.tasks: set[asyncio.Task] = set()
        self._topics: dict[str, faust.TopicT] = {}
        self.input_topic = self._topic(stage.input)
        app.agent(self.input_topic, name=f"{ns}.{stage.name}")(self._run)
        if type(stage).start is not Stage.start:
            app.task(self._prime)

    def _topic(self, spec: TopicSpec) -> faust.TopicT:
        name = spec.full_name(self.settings.kafka.namespace)
        if name not in self._topics:
            self._topics[name] = self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                value_serializer="raw",
                key_serializer="raw",
            )
        return self._topics[name]

    # -- the loop ------------------------------------------------------------------------------

    async def _prime(self) -> None:
        loop = asyncio.get_running_loop()
        emits = await loop.run_in_executor(self.executor, self.stage.start)
        outgoing = []
        for emit in emits:
            try:
                outgoing.append(self._fit(emit))
            except UnusableOutput as exc:  # no input to blame: a dead letter of the start
                log.error("stage %s: a start record is unusable: %s", self.stage.name, exc)
                outgoing.append(self._outgoing(self._dead_letter(exc, None)))
        backoff = self.settings.worker.retry_backoff_s
        while not self.stopping.is_set():  # start() changed the stage's state: send, never redo
            try:
                await self._send(outgoing)
                return
            except Exception:
                log.exception(
                    "stage %s: its start records could not be sent; retrying", self.stage.name
                )
                metrics.RETRIES.labels(stage=self.stage.name, kind="runtime").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.worker.retry_backoff_max_s)

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

    async def _handle(self, events: list[Any]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        backoff = self.settings.worker.retry_backoff_s
        outgoing: list[Outgoing] | None = None
        try:
            while True:  # a broker that is away, a journal disk that is full: wait and retry
                try:
                    if outgoing is None:  # computed once: process() may change a stage's state
                        outgoing = await loop.run_in_executor(self.executor, self._outputs, events)
                    await self._send(outgoing)
                    break
                except (_Stopped, asyncio.CancelledError):
                    return  # not finished: never acknowledged, redelivered
                except Exception:
                    log.exception(
                        "stage %s: a chunk of %d could not finish; retrying in %.0f s",
                        self.stage.name,
                        len(events),
                        backoff,
                    )
                    metrics.RETRIES.labels(stage=self.stage.name, kind="runtime").inc()
                    if self.stopping.is_set():
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.worker.retry_backoff_max_s)
        finally:
            await self._release(len(events))
        for event in self.ledger.finish(events):
            event.ack()
        name = self.stage.name
        metrics.PENDING.labels(stage=name).set(self.ledger.pending)
        metrics.LAST_PROGRESS.labels(stage=name).set(time.time())
        metrics.BATCH_SIZE.labels(stage=name).observe(len(events))
        metrics.BATCH_SECONDS.labels(stage=name).observe(time.perf_counter() - started)

    # -- one chunk -----------------------------------------------------------------------------

    def _outputs(self, events: list[Any]) -> list[Outgoing]:
        """In the stage's thread (the event loop stays free for the consumer and producer):
        decode, answer from the journal or process, fit to the size limit, record in the
        journal, and return what to send, encoded."""
        items: list[_Item] = []
        out: list[Outgoing] = []
        for event in events:
            try:
                record = serde.decode(event.value, self.stage.input_type, self.max_bytes)
            except serde.RecordDecodeError as exc:
                out.append(self._outgoing(self._dead_letter(exc, event.message)))
                continue
            items.append(_Item(record, event.message))
        if not items:
            return out
        recorded = self.journal.get([i.record.id for i in items]) if self.journal else {}
        todo = list({i.record.id: i for i in items if i.record.id not in recorded}.values())
        replayed: set[str] = set()
        for item in items:
            if item.record.id in recorded and item.record.id not in replayed:
                out += [Outgoing.from_journal(entry) for entry in recorded[item.record.id]]
                replayed.add(item.record.id)  # a duplicate in the same chunk replays once
        if todo:
            out += self._decide(todo)
        return out

    def _decide(self, items: list[_Item]) -> list[Outgoing]:
        """Process, record the outputs in the journal; the journal's winner is what is sent
        where another process decided an id first."""
        outcome = self._process(items)
        decided = outcome.by_input
        if self.journal is None:
            return [o for outs in decided.values() for o in outs] + outcome.loose
        # An input that ended in a dead letter is not decided: a replay after a fix runs again.
        failed = {i for i, outs in decided.items() if any(o.dead_letter_reason for o in outs)}
        winners = self.journal.record(
            {i: [o.journal_entry() for o in outs] for i, outs in decided.items() if i not in failed}
        )
        return (
            [Outgoing.from_journal(entry) for entries in winners.values() for entry in entries]
            + [o for i in failed for o in decided[i]]
            + outcome.loose
        )

    def _process(self, items: list[_Item]) -> _Outcome:
        """``stage.process`` and the encoding of its outputs, with the failure policy; never
        raises but ``_Stopped``.

        An input fails when ``process`` raises on it or when an output it produced cannot become
        a record (``UnusableOutput``: a lone surrogate from a model, the wrong type, over the
        size limit); either way it is retried (alone, where the stage isolates failures) up to
        ``max_attempts`` times, then dead-lettered with the reason. Batch-mates whose outputs
        encoded keep them. Transient failures (a server away, a full disk) are retried until
        they pass or the worker stops."""
        if self.stopping.is_set():  # queued behind the chunk in process when the stop came
            raise _Stopped()
        attempts = 0
        backoff = self.settings.worker.retry_backoff_s
        while True:
            try:
                self.stage.ensure_ready()
                emits = self.stage.process([i.record for i in items])
            except Exception as exc:
                if is_transient(exc):
                    log.warning("stage %s: %s; retrying in %.0f s", self.stage.name, exc, backoff)
                    metrics.RETRIES.labels(stage=self.stage.name, kind="transient").inc()
                    self._sleep(backoff)
                    backoff = min(backoff * 2, self.settings.worker.retry_backoff_max_s)
                    continue
                done, failed = _Outcome(), {i.record.id: exc for i in items}
            else:
                done, failed = self._encode(items, emits)
                if not failed:
                    return done
            error = next(iter(failed.values()))
            if self.stage.isolate_failures and len(items) > 1:
                log.error(
                    "stage %s failed on %d of %d records; retrying them one by one",
                    self.stage.name,
                    len(failed),
                    len(items),
                    exc_info=error,
                )
                retry = [i for i in items if i.record.id in failed]
                return _merge([done, *(self._process([item]) for item in retry)])
            attempts += 1
            if attempts < self.runtime.max_attempts:
                log.error(
                    "stage %s failed (attempt %d of %d); retrying",
                    self.stage.name,
                    attempts,
                    self.runtime.max_attempts,
                    exc_info=error,
                )
                metrics.RETRIES.labels(stage=self.stage.name, kind="error").inc()
                self._sleep(self.settings.worker.retry_backoff_s * attempts)
                continue
            log.error(
                "stage %s gave up on %d record(s)", self.stage.name, len(items), exc_info=error
            )
            return _Outcome(
                {
                    i.record.id: [
                        self._outgoing(self._dead_letter(failed.get(i.record.id, error), i.message))
                    ]
                    for i in items
                }
            )

    def _sleep(self, seconds: float) -> None:
        if self.stopping.wait(seconds):
            raise _Stopped()

    def _encode(
        self, items: list[_Item], emits: list[Emit]
    ) -> tuple[_Outcome, dict[str, Exception]]:
        """The outputs encoded and attributed to the input each belongs to (the input itself
        passed on, or its child: the input's id among the record's parents); and the inputs
        whose outputs cannot become records, with why. An output of no single input that cannot
        is the whole chunk's failure."""
        outcome = _Outcome({i.record.id: [] for i in items})
        failed: dict[str, Exception] = {}
        for emit in emits:
            record = emit.record
            owner = next(
                (
                    i.record.id
                    for i in items
                    if record.id == i.record.id or i.record.id in record.parent_ids
                ),
                None,
            )
            try:
                out = self._fit(emit)
            except UnusableOutput as exc:
                if owner is None:
                    return _Outcome(), {i.record.id: exc for i in items}
                failed.setdefault(owner, exc)
                continue
            if owner is None:
                outcome.loose.append(out)
            else:
                outcome.by_input[owner].append(out)
        for owner in failed:
            del outcome.by_input[owner]  # none of a failed input's outputs go out
        return outcome, failed

    def _fit(self, emit: Emit) -> Outgoing:
        """An output as it is sent, or ``UnusableOutput`` when it cannot be a record on its
        topic."""
        record, name = emit.record, self.stage.name
        if not isinstance(record, emit.topic.record):
            raise UnusableOutput(
                serde.OUTPUT_INVALID,
                f"stage {name} emitted a {type(record).__name__} to {emit.topic.name}, "
                f"which carries {emit.topic.record.__name__}",
            )
        try:
            out = self._outgoing(emit)
        except Exception as exc:  # noqa: BLE001 - whatever stops encoding, the record's fault
            raise UnusableOutput(
                serde.OUTPUT_INVALID,
                f"stage {name} produced a {record.kind} record that cannot be encoded: {exc}",
            ) from exc
        if len(out.value) > self.max_bytes:
            raise UnusableOutput(
                serde.OUTPUT_TOO_LARGE,
                f"stage {name} produced a {len(out.value):,}-byte {record.kind} record",
            )
        return out

    def _outgoing(self, emit: Emit) -> Outgoing:
        record = emit.record
        key = str(getattr(record, emit.topic.key, record.id) or record.id)
        return Outgoing(
            topic=emit.topic.name,
            key=key.encode(),
            value=serde.encode(record),
            headers={k: v.decode() for k, v in record.headers().items()},
            dead_letter_reason=getattr(record, "reason", None)
            if emit.topic is DEAD_LETTERS
            else None,
        )

    def _dead_letter(self, exc: Exception, message: Any) -> Emit:
        record = serde.dead_letter(
            stage=self.stage.name,
            error=exc,
            topic=getattr(
                message, "topic", self.stage.input.full_name(self.settings.kafka.namespace)
            ),
            partition=getattr(message, "partition", -1),
            offset=getattr(message, "offset", -1),
            key=getattr(message, "key", None),
            payload=getattr(message, "value", None),
            max_bytes=self.max_bytes,
            reason=exc.reason if isinstance(exc, UnusableOutput) else None,
        )
        return Emit(DEAD_LETTERS, record)

    async def _send(self, outgoing: list[Outgoing]) -> None:
        """Send and wait for the broker's acknowledgement of every record. Straight to the
        producer: Faust's topic.send layers cost more than the send itself (docs/runtime.md)."""
        if not outgoing:
            return
        ns = self.settings.kafka.namespace
        producer = self.app.producer
        futures = [
            await producer.send(
                CATALOGUE[o.topic].full_name(ns),
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
        if self.journal is not None:
            self.journal.close()


def _merge(outcomes) -> _Outcome:
    merged = _Outcome()
    for outcome in outcomes:
        merged.by_input.update(outcome.by_input)
        merged.loose += outcome.loose
    return merged


# --- a process --------------------------------------------------------------------------------


def setup_stages(stages: list[Stage]) -> None:
    """Set every stage up before joining any group: a stage that cannot start (a missing model,
    an unwritable folder) stops the process with one clear line."""
    for stage in stages:
        try:
            stage.ensure_ready()
        except Exception as exc:  # noqa: BLE001 - any set-up failure refuses the start
            raise StartupError(f"stage {stage.name} cannot start: {exc}") from exc


async def run_stages(
    settings: Settings,
    stages: list[Stage],
    bootstrap: str,
    *,
    app_id: str | None = None,
    until: Callable[[], Awaitable[None]] | None = None,
) -> list[Stage]:
    """Run ``stages`` in one Faust app until ``until()`` returns (default: forever), then drain.

    Each process joins one consumer group per app id; a single-stage worker gets its own group,
    so `promptcot worker generate` on ten machines splits the concept partitions ten ways.
    Every process that serves a model role also follows the models topic (workers/reload.py).
    """
    from workers.reload import ModelFollower
    from workers.stage import ModelStage

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, setup_stages, stages)
    group = app_id or f"{settings.kafka.consumer_group_prefix}-{'-'.join(s.name for s in stages)}"
    app = build_app(settings, bootstrap, group)
    agents: list[StageAgent] = []
    follower = None
    monitor = None
    try:  # whatever fails from here (an agent, the app's start) stops what started before it
        for stage in stages:
            agents.append(StageAgent(app, stage, settings))
        if any(isinstance(s, ModelStage) for s in stages):
            follower = ModelFollower(settings, bootstrap)
            follower.start()
        await app.start()
        # A stage stuck from its start is a stall too (ops/prometheus/alerts.yml).
        for stage in stages:
            metrics.LAST_PROGRESS.labels(stage=stage.name).set(time.time())
        monitor = asyncio.create_task(monitoring.monitor(settings, bootstrap, group, stages))
        if until is None:
            await asyncio.Event().wait()
        else:
            await until()
    finally:
        if monitor is not None:
            monitor.cancel()  # lag and health (workers/monitoring.py)
        await _shut_down(app, agents, settings.worker.shutdown_grace_s)
        if follower is not None:
            await follower.stop()
    return stages


async def _shut_down(app: faust.App, agents: list[StageAgent], grace_s: float) -> None:
    loop = asyncio.get_running_loop()

    def now() -> None:  # a second signal: leave at once; unfinished records are redelivered
        log.warning("second signal: exiting now")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, now)
    unfinished = await asyncio.gather(*(a.drain(grace_s) for a in agents))
    if any(unfinished):
        log.warning(
            "stopping with %d unfinished record(s); they will be redelivered", sum(unfinished)
        )
    with contextlib.suppress(Exception):
        await asyncio.wait_for(app.consumer.commit(), timeout=5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(app.stop(), timeout=5)
    for agent in agents:
        agent.close()
