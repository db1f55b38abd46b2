"""The chunk pipeline (workers/pipeline.py) without a broker: input events are plain objects
with the bytes and their coordinates, and what comes back is what the agent would send. The
same guarantees go through the real broker in tests/test_runtime.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from scripted_stage import ScriptedStage

from promptcot.settings import Settings
from streams import serde
from streams.records import ConceptSet
from workers.backoff import Stopped
from workers.pipeline import ChunkPipeline, Outgoing


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        stages={"generate": {"batch_size": 4, "max_attempts": 2}},
        worker={"journal_dir": str(tmp_path / "journal"), "retry_backoff_s": 0.01},
    )


def _pipeline(settings: Settings, stage, stopping: threading.Event | None = None):
    return ChunkPipeline(
        stage,
        settings.stage(stage.name),
        settings.worker,
        settings.kafka,
        stopping or threading.Event(),
    )


def _events(payloads: list[bytes]) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(
            value=p,
            message=SimpleNamespace(topic="t.concepts", partition=0, offset=i, key=b"k", value=p),
        )
        for i, p in enumerate(payloads)
    ]


def _sets(*markers: str) -> list[ConceptSet]:
    return [
        ConceptSet(domain="math", concepts=["ratios", m], difficulty="AMC12", draw=f"c:{i}")
        for i, m in enumerate(markers)
    ]


def _by_topic(outgoing: list[Outgoing]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for o in outgoing:
        found.setdefault(o.topic, []).append(json.loads(o.value))
    return found


def test_a_chunk_becomes_its_outputs_and_dead_letters_of_what_cannot_be_used(tmp_path):
    settings = _settings(tmp_path)
    stage = ScriptedStage(settings)
    pipeline = _pipeline(settings, stage)
    fine, poison, huge = _sets("plain", "poison", "huge")
    payloads = [serde.encode(r) for r in (fine, poison, huge)] + [b"not json"]
    out = _by_topic(pipeline.outputs(_events(payloads)))
    assert [v["subject_id"] for v in out["verdicts"]] == [fine.id]
    reasons = {(d["offset"], d["reason"]) for d in out["deadletter"]}
    assert reasons == {
        (1, serde.PROCESSING_ERROR),
        (2, serde.OUTPUT_TOO_LARGE),
        (3, serde.UNDECODABLE),
    }
    pipeline.close()


def test_a_decided_input_is_answered_from_the_journal_and_a_dead_letter_is_not(tmp_path):
    settings = _settings(tmp_path)
    fine, poison = _sets("plain", "poison")
    events = _events([serde.encode(fine), serde.encode(poison)])
    first = _pipeline(settings, ScriptedStage(settings))
    decided = first.outputs(events)
    first.close()

    stage = ScriptedStage(settings)
    again = _pipeline(settings, stage)
    assert [o for o in again.outputs(events) if o.topic == "verdicts"] == [
        o for o in decided if o.topic == "verdicts"
    ]
    assert [c for c in stage.calls if c == [fine.id]] == []  # never decided twice
    assert [poison.id] in stage.calls  # a dead-lettered input runs again
    again.close()


def test_a_stopping_worker_abandons_a_chunk_not_yet_processed(tmp_path):
    settings = _settings(tmp_path)
    stopping = threading.Event()
    stopping.set()
    stage = ScriptedStage(settings)
    pipeline = _pipeline(settings, stage, stopping)
    with pytest.raises(Stopped):
        pipeline.outputs(_events([serde.encode(_sets("plain")[0])]))
    assert stage.calls == []
    pipeline.close()
