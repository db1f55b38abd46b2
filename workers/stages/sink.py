"""verdicts -> problems: accepted problems become the product, on the problems topic and in a
local Parquet dataset (one file per micro-batch; readers dedup by id)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streams import metrics
from streams.records import Problem, Verdict, content_hash
from streams.topics import PROBLEMS, VERDICTS
from workers.stage import Emit, Stage


def problem_from_verdict(verdict: Verdict) -> Problem:
    return Problem.derived_from(
        verdict,
        candidate_id=verdict.subject_id,
        **verdict.payload(),
        rationale=verdict.rationale,
        reference_answer=verdict.reference_answer,
        reference_source=verdict.reference_source,
        tests=verdict.tests,
        pass_rate=verdict.pass_rate or 0.0,
        n_rollouts=len(verdict.rollouts),
    )


def problems_table(problems: list[Problem]) -> pa.Table:
    rows = [p.model_dump(mode="json") for p in problems]
    for row in rows:  # nested fields as JSON text: a flat schema every reader understands
        row["tests"] = json.dumps(row["tests"])
        row["lineage"] = json.dumps(row["lineage"])
    return pa.Table.from_pylist(rows)


def read_problems(directory: Path) -> list[dict]:
    """All problems in a sink folder, each id once (a redelivered batch may be written twice)."""
    seen: dict[str, dict] = {}
    for path in sorted(Path(directory).glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            seen.setdefault(row["id"], row)
    return list(seen.values())


class SinkStage(Stage[Verdict]):
    name = "sink"
    input = VERDICTS
    outputs = (PROBLEMS,)

    @property
    def directory(self) -> Path:
        return Path(self.settings.sink.output_dir) / "problems"

    def setup(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._written = {row["id"] for row in read_problems(self.directory)}

    def process(self, records: list[Verdict]) -> list[Emit]:
        problems = [problem_from_verdict(v) for v in records if v.accepted]
        fresh = [p for p in problems if p.id not in self._written]
        if fresh:
            name = (
                f"part-{int(time.time() * 1000)}-{content_hash([p.id for p in fresh], 8)}.parquet"
            )
            tmp = self.directory / f".{name}.tmp"
            pq.write_table(problems_table(fresh), tmp)
            tmp.rename(self.directory / name)  # readers never see a half-written file
            self._written.update(p.id for p in fresh)
            for p in fresh:
                metrics.ACCEPTED.labels(domain=p.domain).inc()
        # Re-emit even already-written problems: the topic is at-least-once, ids make it idempotent.
        return [self.emit(PROBLEMS, p) for p in problems]
