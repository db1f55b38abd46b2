"""Export verified problems, each id once, to one Parquet file or a Hugging Face dataset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from workers.stages.sink import problems_table, read_problems

if TYPE_CHECKING:
    from promptcot.settings import Settings


def _from_topic(settings: Settings) -> list[dict]:
    from streams.clients import read_topic

    problems = {}
    for record in read_topic(settings.kafka, "problems"):
        problems.setdefault(record.id, record)
    return problems_table(list(problems.values())).to_pylist() if problems else []


def export_problems(
    settings: Settings, out: Path, *, fmt: str = "parquet", source: str = "sink"
) -> int:
    """Write the problems to ``out``; returns how many. Raises FileNotFoundError when the sink
    folder does not exist (a wrong ``sink.output_dir`` must not yield an empty file)."""
    if fmt not in ("parquet", "hf"):
        raise ValueError(f"unknown format {fmt!r}: parquet or hf")
    if source == "sink":
        folder = Path(settings.sink.output_dir) / "problems"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no problems folder at {folder} (sink.output_dir is "
                f"{settings.sink.output_dir}); nothing to export"
            )
        rows = read_problems(folder)
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
    else:
        import datasets

        datasets.Dataset(table).save_to_disk(str(out))
    return len(rows)
