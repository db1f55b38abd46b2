"""Helpers for tests that run stages through the real (embedded) broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from promptcot.settings import Settings
from streams.clients import read_raw
from streams.records import Record
from streams.serde import RecordDecodeError, decode
from streams.topics import CATALOGUE, TopicSpec


def factory_settings(tmp_path: Path, bootstrap: str, model_dir: Path, **overrides) -> Settings:
    """Settings for a test factory: its own namespace, the tiny model in every role, state in
    tmp_path, no metrics port, short micro-batch windows."""
    model = {"kind": "transformers", "model": str(model_dir), "max_model_len": 1024}
    quick = {"batch_size": 4, "batch_within_s": 0.3}
    base = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "namespace": f"t{uuid.uuid4().hex[:8]}",
            "partitions": 2,
        },
        "models": dict.fromkeys(
            ("prompt_model", "rationale_model", "solver", "test_writer", "annotator"), model
        ),
        "stages": dict.fromkeys(("generate", "verify", "filter", "annotate", "rationale"), quick),
        "sink": {"output_dir": str(tmp_path / "out")},
        "worker": {"journal_dir": str(tmp_path / "journal")},
        "vectorstore": {"store": {"uri": str(tmp_path / "lancedb")}},
        "metrics": {"port": 0},
        "generation": {"max_rationale_tokens": 48, "max_problem_tokens": 64},
        "verify": {"rollouts": 4, "max_tokens": 96},
        "rationale": {"samples": 2, "max_tokens": 48},
        "annotate": {"max_tokens": 48},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings(**base)


def read_records(
    settings: Settings, topic: str, idle_s: float = 1.0
) -> list[tuple[Record | None, object]]:
    """(decoded record or None, raw message) for every message of a catalogue topic."""
    spec: TopicSpec = CATALOGUE[topic]
    out = []
    for message in read_raw(
        settings.kafka,
        settings.kafka.bootstrap_servers,
        spec.full_name(settings.kafka.namespace),
        idle_s=idle_s,
    ):
        try:
            out.append((decode(message.value, spec.record), message))
        except RecordDecodeError:
            out.append((None, message))
    return out


async def wait_until(check: Callable[[], bool], timeout_s: float, poll_s: float = 2.0) -> None:
    """Poll ``check`` (run in a thread: it does blocking Kafka reads) until true or timeout."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await loop.run_in_executor(None, check):
            return
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"condition not met within {timeout_s}s")


def start_worker(settings: Settings, argv: list[str], log: Path, env: dict[str, str]):
    """A worker process on the test's broker and namespace (no metrics port, INFO logs) in a
    session of its own, its output appended to ``log``; ``env`` adds or overrides variables."""
    full = {
        **os.environ,
        "PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "PROMPTCOT_KAFKA__NAMESPACE": settings.kafka.namespace,
        "PROMPTCOT_METRICS__PORT": "0",
        "PROMPTCOT_LOG_LEVEL": "INFO",
        **env,
    }
    return subprocess.Popen(
        argv, env=full, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for(
    predicate: Callable[[], bool],
    proc: subprocess.Popen,
    log: Path,
    timeout_s: float,
    poll_s: float = 0.3,
) -> None:
    """Poll ``predicate`` until true; fail with the worker's log tail if it exits or time runs
    out."""
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(poll_s)
    pytest.fail(f"timed out; worker log:\n{log.read_text()[-3000:]}")
