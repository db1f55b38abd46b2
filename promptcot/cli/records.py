"""Topics and records: the catalogue, reading a topic, exporting the product, the schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from promptcot.cli.app import BootstrapOpt, ConfigOpt, app, console, load, require_cluster


@app.command()
def topics(config: ConfigOpt = None, bootstrap: BootstrapOpt = None) -> None:
    """List the topic catalogue; with a cluster configured, create missing topics and show
    their partition counts."""
    from streams.topics import CATALOGUE

    settings = load(config, bootstrap)
    ns = settings.kafka.namespace
    live: dict[str, int] = {}
    if settings.kafka.bootstrap_servers:
        from kafka import KafkaConsumer

        from streams.cluster import kafka_python_config
        from streams.topics import ensure_topics

        kcfg = kafka_python_config(settings.kafka, require_cluster(settings))
        ensure_topics(kcfg, ns, settings.kafka.partitions, settings.kafka.replication_factor)
        consumer = KafkaConsumer(**kcfg)
        for spec in CATALOGUE.values():
            live[spec.full_name(ns)] = len(consumer.partitions_for_topic(spec.full_name(ns)) or ())
        consumer.close()
    table = Table("topic", "record", "key", "partitions", "what")
    for spec in CATALOGUE.values():
        name = spec.full_name(ns)
        parts = str(live.get(name, spec.partitions or settings.kafka.partitions))
        table.add_row(name, spec.record.__name__, spec.key, parts, spec.doc)
    console.print(table)


@app.command()
def tail(
    topic: Annotated[str, typer.Argument(help="Topic short name (e.g. problems) or full name.")],
    n: Annotated[int, typer.Option("-n", help="Records to show (from the beginning).")] = 10,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records.")
    ] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Pretty-print records of a topic."""
    from streams.clients import read_topic, resolve_topic

    settings = load(config, bootstrap)
    try:
        resolve_topic(settings.kafka, topic)  # an unknown topic fails before any connection
    except KeyError as exc:
        raise typer.BadParameter(exc.args[0]) from None
    bootstrap = require_cluster(settings)
    records = read_topic(settings.kafka, topic, bootstrap=bootstrap, follow=follow)
    for shown, record in enumerate(records, start=1):
        console.rule(f"{record.kind} {record.id}")
        console.print_json(record.model_dump_json())
        if not follow and shown >= n:
            break


@app.command()
def export(
    out: Annotated[
        Path, typer.Option(help="Output: a .parquet file, or a folder for --format hf.")
    ] = Path("problems.parquet"),
    fmt: Annotated[
        str, typer.Option("--format", help="parquet or hf (datasets.save_to_disk).")
    ] = "parquet",
    source: Annotated[str, typer.Option(help="sink (the local Parquet folder) or topic.")] = "sink",
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Export verified problems (each id once) to Parquet or a Hugging Face dataset."""
    from promptcot.export import export_problems

    settings = load(config, bootstrap)
    if source == "topic":
        require_cluster(settings)
    n = export_problems(settings, out, fmt=fmt, source=source)
    console.print(f"exported {n} problems to [cyan]{out}[/]")


@app.command()
def schemas(
    out: Annotated[Path, typer.Option(help="Folder for one JSON Schema per record type.")] = Path(
        "schemas"
    ),
) -> None:
    """Write the JSON Schema of every record type: the contract for downstream consumers."""
    from streams.records import RECORD_TYPES
    from streams.topics import CATALOGUE

    out.mkdir(parents=True, exist_ok=True)
    topics_by_kind: dict[str, list[str]] = {}
    for spec in CATALOGUE.values():
        topics_by_kind.setdefault(spec.record.kind, []).append(spec.name)
    for kind, cls in RECORD_TYPES.items():
        schema = cls.model_json_schema()
        schema["x-topics"] = topics_by_kind.get(kind, [])
        (out / f"{kind}.schema.json").write_text(json.dumps(schema, indent=2, ensure_ascii=False))
    console.print(f"wrote {len(RECORD_TYPES)} schemas to [cyan]{out}[/]")
