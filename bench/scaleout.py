"""Scale-out: 1 vs 2 `promptcot worker generate` processes of a latency-bound stage.

Each worker talks to a loopback model server (its own process, far more capacity than the
workers use) with the OpenAI-compatible backend at a small ``concurrency``, so one worker is
bound by latency x requests in flight, not by CPU or the server: a second worker should nearly
double the rate. Workers are fresh processes per run, joined before the clock starts (each has
consumed a warm-up record, read from its own Prometheus endpoint); the clock runs from the first
publish until the workers' acknowledged outputs (promptcot_records_out_total, summed over their
endpoints) cover every record. Runs alternate 1, 2, 1, 2, ... Goal: 2 workers >= 1.7x 1 worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.generation import bench_concept_sets
from bench.harness import ROOT, Row, ratios, timing
from bench.stagerun import JOURNALS, bench_settings, create_topics, loopback_process

CASE = "scale-out (generate workers, loopback server)"
PARTITIONS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counter(port: int, name: str) -> float:
    """Sum of a counter's samples for the generate stage on one worker's /metrics."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and 'stage="generate"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Workers:
    def __init__(self, settings, url: str, concurrency: int, count: int, log_dir: Path):
        self.ports = [_free_port() for _ in range(count)]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "PROMPTCOT_KAFKA__NAMESPACE": settings.kafka.namespace,
            "PROMPTCOT_KAFKA__PARTITIONS": str(PARTITIONS),
            # A group of its own per run: a stopped run's members must not hold up the next.
            "PROMPTCOT_KAFKA__CONSUMER_GROUP_PREFIX": settings.kafka.namespace,
            "PROMPTCOT_MODELS": json.dumps(
                {
                    "prompt_model": {
                        "kind": "openai",
                        "model": "loopback",
                        "base_url": url,
                        "concurrency": concurrency,
                    }
                }
            ),
            "PROMPTCOT_WORKER__JOURNAL_DIR": str(JOURNALS),
            "PROMPTCOT_GENERATION__MAX_RATIONALE_TOKENS": "16",
            "PROMPTCOT_GENERATION__MAX_PROBLEM_TOKENS": "16",
        }
        self.procs = []
        for i, port in enumerate(self.ports):
            log = open(log_dir / f"worker{i}.log", "wb")  # noqa: SIM115 (closed by the child)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "promptcot", "worker", "generate"],
                    env={**env, "PROMPTCOT_METRICS__PORT": str(port)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                    start_new_session=True,
                )
            )
            log.close()

    def total(self, name: str) -> list[float]:
        return [_counter(port, name) for port in self.ports]

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited with {proc.returncode}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _wait(check, timeout_s: float, workers: Workers, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        workers.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def one_run(broker, url: str, n_workers: int, n_records: int, concurrency: int, tag: str) -> float:
    from streams.clients import publish
    from streams.topics import CONCEPTS

    settings = bench_settings(broker.bootstrap_servers, partitions=PARTITIONS)
    create_topics(settings)
    kafka = settings.kafka
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as logs:
        workers = Workers(settings, url, concurrency, n_workers, Path(logs))
        try:
            # Warm-up: keep feeding a few records until every worker has consumed some, i.e.
            # each holds partitions and the group has settled.
            warm = 0
            while min(workers.total("promptcot_records_in_total")) == 0:
                workers.check_alive()
                publish(
                    kafka,
                    kafka.bootstrap_servers,
                    CONCEPTS,
                    bench_concept_sets(PARTITIONS * 2, tag=f"{tag}-warm{warm}"),
                )
                warm += 1
                time.sleep(1.0)
                if warm > 120:
                    raise TimeoutError("workers did not join in 120 s")
            _wait(
                lambda: sum(workers.total("promptcot_records_out_total")) >= warm * PARTITIONS * 2,
                120,
                workers,
                "warm-up outputs",
            )
            base = sum(workers.total("promptcot_records_out_total"))
            started = time.perf_counter()
            publish(kafka, kafka.bootstrap_servers, CONCEPTS, bench_concept_sets(n_records, tag))
            _wait(
                lambda: sum(workers.total("promptcot_records_out_total")) >= base + n_records,
                600,
                workers,
                "outputs",
            )
            return n_records / (time.perf_counter() - started)
        finally:
            workers.stop()


def measure(quick: bool = False) -> list[Row]:
    from streams.broker import EmbeddedBroker

    n_records, concurrency, runs = (96, 4, 3) if quick else (400, 8, 3)
    latency_s = 0.1
    one, two = [], []
    with (
        loopback_process(latency_s=latency_s, capacity=1024) as (url, _),
        EmbeddedBroker() as broker,
    ):
        for r in range(runs):
            one.append(one_run(broker, url, 1, n_records, concurrency, f"one{r}"))
            two.append(one_run(broker, url, 2, n_records, concurrency, f"two{r}"))
    setup = f"{n_records} records, concurrency {concurrency} per worker, {latency_s} s per request"
    return [
        timing(
            CASE, f"2 workers / 1 worker, records/s ({setup})", ratios(two, one), "x", at_least=1.7
        ),
        timing(CASE, "1 worker", one, "records/s"),
        timing(CASE, "2 workers", two, "records/s"),
    ]
