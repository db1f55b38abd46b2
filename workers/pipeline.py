"""One chunk of a stage's input, from bytes to the encoded records to send: the stage runtime's
work that needs no broker (the Faust side, which sends them, is workers/agent.py). It runs in
the stage's thread, so the event loop only moves bytes. Each chunk:

1. is decoded; bytes that can't be read (not JSON, wrong schema, a newer schema version, over
   ``kafka.max_record_bytes``) become dead letters with the reason and their coordinates;
2. is looked up in the stage's journal (workers/journal.py): an input decided before is
   answered with the recorded outputs, never decided again;
3. runs the stage's ``process``. A transient failure (a model server down, a full disk) is
   retried with backoff until it works or the worker stops (workers/backoff.py); any other
   exception, or an output that cannot become a record, is retried record by record (the
   window, for the trainer) and the records that keep failing become dead letters with the
   error (``ChunkPipeline._process``, the failure policy);
4. has its outputs recorded in the journal, then returned to be sent (a failed send is retried
   with the same outputs, never by processing again); when every send is acknowledged by the
   broker, its input messages are finished (workers/offsets.py).

The cost of a chunk: per chunk, one journal read, one ``process`` call and one journal write
(more calls on a failure); per input record, one decode (``outputs``); per output record, its
owner found among the chunk's inputs (``_encode``) and its encoding: type check, JSON, size
check, headers (``_fit``).
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from streams import metrics, serde
from streams.records import Record
from streams.topics import DEAD_LETTERS
from workers.backoff import Backoff, Stopped, pause
from workers.journal import Journal
from workers.stage import Emit, Stage

if TYPE_CHECKING:
    from streams.settings import KafkaSettings
    from workers.settings import StageRuntime, WorkerSettings

log = logging.getLogger(__name__)

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


def _merge(outcomes) -> _Outcome:
    merged = _Outcome()
    for outcome in outcomes:
        merged.by_input.update(outcome.by_input)
        merged.loose += outcome.loose
    return merged


class ChunkPipeline:
    """One stage's chunks, from input events (anything with ``value``, the bytes, and
    ``message``, their coordinates: a Faust event) to what to send. ``stopping`` is the
    worker's: once set, a chunk not yet processed is abandoned (``Stopped``)."""

    def __init__(
        self,
        stage: Stage,
        runtime: StageRuntime,
        worker: WorkerSettings,
        kafka: KafkaSettings,
        stopping: threading.Event,
    ):
        self.stage = stage
        self.runtime = runtime
        self.worker = worker
        self.max_bytes = kafka.max_record_bytes
        self.input_topic = stage.input.full_name(kafka.namespace)
        self.stopping = stopping
        self.journal = (
            Journal(
                worker.journal_dir / kafka.namespace / f"{stage.name}.sqlite",
                worker.journal_retention_days * 86400,
            )
            if stage.journaled
            else None
        )

    def outputs(self, events: list[Any]) -> list[Outgoing]:
        """Decode, answer from the journal or process, fit to the size limit, record in the
        journal, and return what to send, encoded. Raises ``Stopped`` when the worker stops
        first."""
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

    def start_outputs(self, emits: list[Emit]) -> list[Outgoing]:
        """The records a stage emits at start, encoded; one that cannot be a record becomes a
        dead letter of the start (there is no input to blame)."""
        outgoing = []
        for emit in emits:
            try:
                outgoing.append(self._fit(emit))
            except UnusableOutput as exc:
                log.error("stage %s: a start record is unusable: %s", self.stage.name, exc)
                outgoing.append(self._outgoing(self._dead_letter(exc, None)))
        return outgoing

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

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
        raises but ``Stopped``.

        An input fails when ``process`` raises on it or when an output it produced cannot become
        a record (``UnusableOutput``: a lone surrogate from a model, the wrong type, over the
        size limit); either way it is retried (alone, where the stage isolates failures) up to
        ``max_attempts`` times, then dead-lettered with the reason. Batch-mates whose outputs
        encoded keep them. Transient failures (a server away, a full disk) are retried until
        they pass or the worker stops."""
        if self.stopping.is_set():  # queued behind the chunk in process when the stop came
            raise Stopped()
        attempts = 0
        delays = Backoff.of(self.worker)
        while True:
            try:
                self.stage.ensure_ready()
                emits = self.stage.process([i.record for i in items])
            except Exception as exc:
                if is_transient(exc):
                    delay = delays.next()
                    log.warning("stage %s: %s; retrying in %.0f s", self.stage.name, exc, delay)
                    metrics.RETRIES.labels(stage=self.stage.name, kind="transient").inc()
                    pause(self.stopping, delay)
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
                pause(self.stopping, self.worker.retry_backoff_s * attempts)
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
            topic=getattr(message, "topic", self.input_topic),
            partition=getattr(message, "partition", -1),
            offset=getattr(message, "offset", -1),
            key=getattr(message, "key", None),
            payload=getattr(message, "value", None),
            max_bytes=self.max_bytes,
            reason=exc.reason if isinstance(exc, UnusableOutput) else None,
        )
        return Emit(DEAD_LETTERS, record)
