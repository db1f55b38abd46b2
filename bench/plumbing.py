"""Plumbing: an echo stage end to end through the embedded broker, records/s.

The stage does no work (each candidate is passed on to candidates.unique as it is), so the
figure is the runtime's cost per record: consume, decode, process, encode, produce, wait for the
broker's acks, commit. Timed from the first publish until every output is acknowledged, after a
warm-up that lets the consumer group settle. Goal: >= 2,000 records/s on 2 cores.
"""

from __future__ import annotations

from bench.harness import Row, timing
from bench.stagerun import bench_settings, run_stage

CASE = "plumbing (echo stage, embedded broker)"


def echo_stage(settings):
    from streams.records import CandidateProblem
    from streams.topics import CANDIDATES, CANDIDATES_UNIQUE
    from workers.stage import Emit, Stage

    class EchoStage(Stage[CandidateProblem]):
        # Borrows the filter's place in the flow and its runtime settings (stages.filter).
        name = "filter"
        input = CANDIDATES
        outputs = (CANDIDATES_UNIQUE,)

        def process(self, records: list[CandidateProblem]) -> list[Emit]:
            return [self.emit(CANDIDATES_UNIQUE, r) for r in records]

    return EchoStage(settings)


def candidates(count: int, tag: str) -> list:
    from streams.records import CandidateProblem

    return [
        CandidateProblem(
            concept_set_id=f"{tag}-{i}",
            generator="bench",
            domain="math",
            difficulty="AIME",
            concepts=["counting objects", "equal groups"],
            rationale="Combine counting with equal groups.",
            problem=f"Ana has {i} boxes of 3 apples. How many apples does she have?",
        )
        for i in range(count)
    ]


def measure(quick: bool = False) -> list[Row]:
    from streams.broker import EmbeddedBroker
    from streams.topics import CANDIDATES

    n_records, runs = (3000, 3) if quick else (20000, 5)
    rates: list[float] = []
    with EmbeddedBroker() as broker:
        settings = bench_settings(broker.bootstrap_servers)

        async def body(driver) -> None:
            await driver.pump(CANDIDATES, candidates(200, "warm"))
            for r in range(runs):
                seconds = await driver.pump(CANDIDATES, candidates(n_records, f"run{r}"))
                rates.append(n_records / seconds)

        run_stage(settings, echo_stage(settings), body)
    batch = settings.stage("filter")
    return [
        timing(
            CASE,
            f"records/s end to end ({n_records} records; micro-batches of {batch.batch_size})",
            rates,
            "records/s",
            at_least=2000,
        )
    ]
