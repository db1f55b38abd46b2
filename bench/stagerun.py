"""Shared by the cases that run real stages through the real embedded broker: settings for a
benchmark namespace, a loopback model server in its own process, and a driver that publishes
records and times them until the stage's outputs are acknowledged (the stage's own
``promptcot_records_out_total``, counted after the broker's acks)."""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.harness import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The runtime journals every decision (workers/journal.py): keep a benchmark's out of the
# working folder and gone after it.
JOURNALS = Path(tempfile.mkdtemp(prefix="bench-journal-"))
atexit.register(shutil.rmtree, JOURNALS, True)


def bench_settings(bootstrap: str, partitions: int = 2, **sections: Any):
    from promptcot.settings import Settings

    base: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "namespace": f"bench{uuid.uuid4().hex[:8]}",
            "partitions": partitions,
        },
        "metrics": {"port": 0},
        "worker": {"journal_dir": str(JOURNALS)},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings(**base)


def create_topics(settings) -> None:
    from streams.cluster import kafka_python_config
    from streams.topics import ensure_topics

    kafka = settings.kafka
    ensure_topics(
        kafka_python_config(kafka, kafka.bootstrap_servers), kafka.namespace, kafka.partitions, 1
    )


def outputs_of(stage: str) -> float:
    """Records this process's ``stage`` has produced (acknowledged by the broker): its own
    counter children, not a walk of the whole registry (that reads /proc on every call)."""
    from streams import metrics

    return metrics.counter_value(metrics.RECORDS_OUT, stage=stage)


class Driver:
    """Publishes records into a running stage and waits for its outputs."""

    def __init__(self, settings, stage: str):
        self.settings = settings
        self.stage = stage

    async def pump(self, spec, records: Sequence, per_input: int = 1, timeout_s: float = 600):
        """Seconds from the first publish until ``per_input`` outputs per record are acked.
        Published with aiokafka in this event loop: kafka-python's pure-Python checksums would
        make the driver cost as much CPU as the stage it measures."""
        from aiokafka import AIOKafkaProducer

        from streams import serde
        from streams.cluster import aiokafka_config

        kafka = self.settings.kafka
        encoded = [
            (str(getattr(r, spec.key, r.id) or r.id).encode(), serde.encode(r)) for r in records
        ]
        target = outputs_of(self.stage) + per_input * len(records)
        producer = AIOKafkaProducer(**aiokafka_config(kafka, kafka.bootstrap_servers), acks="all")
        await producer.start()
        started = time.perf_counter()
        try:
            for key, value in encoded:
                await producer.send(spec.full_name(kafka.namespace), value, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        while outputs_of(self.stage) < target:
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"{self.stage}: outputs not acknowledged in {timeout_s} s")
            await asyncio.sleep(0.02)
        return time.perf_counter() - started


def run_stage(settings, stage, body: Callable[[Driver], Awaitable[Any]]) -> Any:
    """Run ``stage`` in this process (workers.runtime.run_stages) while ``body(driver)`` runs;
    returns what ``body`` returns."""
    from workers.runtime import run_stages

    create_topics(settings)
    result: dict[str, Any] = {}

    async def until() -> None:
        result["value"] = await body(Driver(settings, stage.name))

    asyncio.run(
        run_stages(
            settings,
            [stage],
            settings.kafka.bootstrap_servers,
            app_id=f"{settings.kafka.namespace}-{stage.name}",
            until=until,
        )
    )
    return result["value"]


@contextmanager
def loopback_process(**options: Any):
    """``python -m promptcot loopback-server`` in its own process; yields (url, stats())."""
    argv = [sys.executable, "-m", "promptcot", "loopback-server", "--port", "0"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, env=env, text=True, start_new_session=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "ready" not in line:
            raise RuntimeError(f"loopback server did not start: {line!r}")
        url = line.split()[-1]
        root = url.removesuffix("/v1")

        def stats() -> dict[str, Any]:
            return httpx.get(f"{root}/stats", timeout=10).json()

        yield url, stats
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def busy(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """What the loopback server did between two /stats reads: mean requests running, the share
    of its capacity in use (busy), and the share of time at full capacity."""
    elapsed = after["uptime_s"] - before["uptime_s"]
    slot_s = after["slot_s"] - before["slot_s"]
    return {
        "mean_running": slot_s / elapsed,
        "busy": slot_s / (after["capacity"] * elapsed),
        "full": (after["full_s"] - before["full_s"]) / elapsed,
        "requests": after["requests"] - before["requests"],
    }
