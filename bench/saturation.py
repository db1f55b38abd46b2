"""Engine saturation: does the generate stage keep a continuously batching server full?

A loopback OpenAI-compatible server (its own process; fixed latency per request and per token;
``capacity`` requests served at once, like an engine's max concurrent sequences) stands in for
the GPU server. Side by side, interleaved in one run:

- stage: concept sets published to the embedded broker, the real generate stage
  (workers.runtime.run_stages) with the OpenAI-compatible backend at ``concurrency = capacity``,
  timed until every output is acknowledged by the broker;
- direct: the same two calls per concept set (rationale, then problem) sent straight to the
  server through the same backend from ``capacity`` threads: the most the server can give.

Goals: stage >= 0.9x direct (records/s) and the server busy >= 95% of the stage's run (busy =
slot-seconds in use / (capacity x run time), from the server's own in-flight report).

CPU per record (issue 18 item 4): this process's CPU time (every thread; the server and the
broker are other processes) over each arm, per record. The direct arm's is the backend's client
(HTTP, JSON) alone; the stage's adds the runtime (consume, decode, the stage's own work,
encode, produce, offsets) and the driver's publishing, so stage - direct is the runtime's own
cost per record, model time excluded.
"""

from __future__ import annotations

import asyncio
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from bench.generation import bench_concept_sets, direct_record
from bench.harness import Row, row, timing
from bench.stagerun import bench_settings, busy, loopback_process, run_stage

CASE = "engine saturation (loopback)"


def measure(quick: bool = False) -> list[Row]:
    from llm.backends import make_backend
    from llm.roles import Role
    from streams.broker import EmbeddedBroker
    from streams.topics import CONCEPTS
    from workers.stages.generate import GenerateStage

    capacity = 16 if quick else 32
    n_records = 240 if quick else 1200
    runs = 3
    latency_s, per_token_s, max_tokens = 0.1, 0.002, 32
    with (
        loopback_process(latency_s=latency_s, per_token_s=per_token_s, capacity=capacity) as (
            url,
            stats,
        ),
        EmbeddedBroker() as broker,
    ):
        settings = bench_settings(
            broker.bootstrap_servers,
            models={
                "prompt_model": {
                    "kind": "openai",
                    "model": "loopback",
                    "base_url": url,
                    "concurrency": capacity,
                    "timeout_s": 60,
                }
            },
            generation={"max_rationale_tokens": max_tokens, "max_problem_tokens": max_tokens},
        )
        stage = GenerateStage(settings)
        backend = make_backend(settings.models.role(Role.PROMPT_MODEL))
        gen = settings.generation
        figures: dict[str, list[float]] = {
            k: []
            for k in (
                "stage",
                "direct",
                "busy_stage",
                "busy_direct",
                "mean_stage",
                "mean_direct",
                "full_stage",
                "full_direct",
                "cpu_stage",
                "cpu_direct",
            )
        }

        def direct(sets) -> float:
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=capacity) as pool:
                list(pool.map(lambda cs: direct_record(backend, gen, cs), sets))
            return time.perf_counter() - started

        async def body(driver) -> None:
            loop = asyncio.get_running_loop()
            await driver.pump(CONCEPTS, bench_concept_sets(2 * capacity, tag="warm"))
            for r in range(runs):
                sets = bench_concept_sets(n_records, tag=f"direct{r}")
                before = await loop.run_in_executor(None, stats)
                cpu = cpu_seconds()
                seconds = await loop.run_in_executor(None, direct, sets)
                figures["cpu_direct"].append(1000 * (cpu_seconds() - cpu) / n_records)
                served = busy(before, await loop.run_in_executor(None, stats))
                figures["direct"].append(n_records / seconds)
                figures["busy_direct"].append(100 * served["busy"])
                figures["mean_direct"].append(served["mean_running"])
                figures["full_direct"].append(100 * served["full"])

                sets = bench_concept_sets(n_records, tag=f"stage{r}")
                before = await loop.run_in_executor(None, stats)
                cpu = cpu_seconds()
                seconds = await driver.pump(CONCEPTS, sets)
                figures["cpu_stage"].append(1000 * (cpu_seconds() - cpu) / n_records)
                served = busy(before, await loop.run_in_executor(None, stats))
                figures["stage"].append(n_records / seconds)
                figures["busy_stage"].append(100 * served["busy"])
                figures["mean_stage"].append(served["mean_running"])
                figures["full_stage"].append(100 * served["full"])

        try:
            run_stage(settings, stage, body)
        finally:
            backend.close()

    ratio = [s / d for s, d in zip(figures["stage"], figures["direct"], strict=True)]
    runtime_cpu = [s - d for s, d in zip(figures["cpu_stage"], figures["cpu_direct"], strict=True)]
    setup = (
        f"{n_records} concept sets, capacity {capacity}, {latency_s} s + {per_token_s} s/token, "
        f"2 x {max_tokens} tokens"
    )
    return [
        timing(CASE, f"generate stage / direct, records/s ({setup})", ratio, "x", at_least=0.9),
        timing(CASE, "server busy during the stage's run", figures["busy_stage"], "%", at_least=95),
        timing(CASE, "server busy during the direct run", figures["busy_direct"], "%"),
        timing(CASE, "generate stage", figures["stage"], "records/s"),
        timing(CASE, "direct to the server", figures["direct"], "records/s"),
        timing(
            CASE, "requests in flight, stage (mean over the run)", figures["mean_stage"], "requests"
        ),
        timing(
            CASE,
            "requests in flight, direct (mean over the run)",
            figures["mean_direct"],
            "requests",
        ),
        timing(CASE, "time at full capacity, stage", figures["full_stage"], "%"),
        timing(CASE, "time at full capacity, direct", figures["full_direct"], "%"),
        timing(CASE, "CPU per record, stage process (runtime, client)", figures["cpu_stage"], "ms"),
        timing(CASE, "CPU per record, direct (the client alone)", figures["cpu_direct"], "ms"),
        timing(CASE, "CPU per record, the runtime's own (stage - direct)", runtime_cpu, "ms"),
        row(
            CASE,
            "requests in flight the backend asks for (max_in_flight)",
            float(backend.max_in_flight),
            "requests",
        ),
    ]


def cpu_seconds() -> float:
    """CPU time of this process so far, user + system, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
