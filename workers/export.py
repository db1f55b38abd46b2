"""Export verified problems, each id once, to one Parquet file or a Hugging Face dataset."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from streams.settings import Settings
from workers.stages.sink import problems_table, read_problems


def _from_topic(settings: Settings) -> list[dict]:
    from streams.clients import read_topic

    problems = {}
    for record in read_topic(settings, "problems"):
        problems.setdefault(record.id, record)
    return problems_table(list(problems.values())).to_pylist() if problems else []


def export_problems(settings: Settings, out: Path, *, fmt: str = "parquet", source: str = "sink") -> int:
    if source == "sink":
        rows = read_problems(Path(settings.sink.output_dir) / "problems")
    elif source == "topic":
        if not settings.kafka.bootstrap_servers:
            raise ValueError("export from the topic needs kafka.bootstrap_servers")
        rows = _from_topic(settings)
    else:
        raise ValueError(f"unknown source {source!r}: sink or topic")
    table = pa.Table.from_pylist(rows)
    out = Path(out)
    if fmt == "parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    elif fmt == "hf":
        import datasets

        datasets.Dataset(table).save_to_disk(str(out))
    else:
        raise ValueError(f"unknown format {fmt!r}: parquet or hf")
    return len(rows)
