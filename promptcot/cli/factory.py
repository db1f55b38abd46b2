"""Running the factory: everything in one process (`up`), one stage (`worker`), the broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from promptcot.cli.app import (
    BootstrapOpt,
    ConfigOpt,
    app,
    console,
    load,
    parse_duration,
    require_cluster,
)
from promptcot.registry import DATA_STAGES, STAGES, TRAINER_STAGES, make_stage


@app.command()
def up(
    max_problems: Annotated[int, typer.Option(help="Stop after this many verified problems.")] = 3,
    duration: Annotated[str, typer.Option(help="Stop after this long (e.g. 25m).")] = "25m",
    seeds: Annotated[
        int, typer.Option(help="Seed problems to publish for annotate (the EM loop's seed set).")
    ] = 16,
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated stages (default: the data path and the trainer)."),
    ] = None,
    train: Annotated[
        bool,
        typer.Option(
            "--train/--no-train",
            help="Run the trainer stages (cold start, EM, DPO; sized by trainer.profile); "
            "--no-train: a pure generator.",
        ),
    ] = True,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run the whole factory in one process: broker (embedded unless configured), every stage
    and the training loop, live counts, and a summary of what came out, where it is, and the
    model versions the trainer reached."""
    from promptcot.progress import FactoryProgress
    from streams import metrics
    from streams.cluster import Cluster
    from workers.runtime import run_stages

    settings = load(config, bootstrap)
    names = stage_names(stages, train)
    limit_s = parse_duration(duration)
    started = time.monotonic()  # the time limit counts the cold start too
    metrics.serve(settings.metrics.host, settings.metrics.port)

    with console.status("starting broker and topics..."):
        cluster = Cluster.connect(settings.kafka, settings.embedded_broker)
    where = "embedded broker" if cluster.broker else "cluster"
    console.print(
        f"[bold]PromptCoT factory[/] on {where} [cyan]{cluster.bootstrap}[/], "
        f"stages: {', '.join(names)}"
    )
    if settings.metrics.port:
        console.print(f"metrics: http://{settings.metrics.host}:{settings.metrics.port}/metrics")
    if seeds and "annotate" in names:
        n = publish_seeds(settings, cluster.bootstrap, "gsm8k", seeds)
        console.print(f"published {n} seed problems for annotate/rationale")
    if "em" in names:
        cold_start_first(settings, cluster.bootstrap)
        serve_newest(settings)

    progress = FactoryProgress(started=started)
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
            else:
                progress.stop_reason = "interrupted"
            live.update(progress.table())

    try:
        asyncio.run(
            run_stages(
                settings,
                [make_stage(n, settings) for n in names],
                cluster.bootstrap,
                app_id="promptcot-factory",
                until=until,
            )
        )
    finally:
        cluster.close()
    console.print(progress.summary(Path(settings.sink.output_dir)))
    # A model call still running in a stage thread cannot be interrupted and would hold the exit
    # for minutes; its input was never committed, so a next run redelivers it. Nothing is lost.
    sys.stdout.flush()
    os._exit(0)


def cold_start_first(settings, bootstrap: str) -> None:
    """The paper's cold start before anything generates, when p_θ or q_φ has no checkpoint yet
    (the em stage would run it too, but in one process it would share the CPU with every other
    stage, and generation would meanwhile run on the base model). Announced on the models topic."""
    cfg = settings.trainer
    if not (cfg.enabled and cfg.cold_start.enabled and cfg.cold_start.on_first_start):
        return
    from streams.clients import publish
    from streams.topics import MODELS
    from trainer.coldstart import cold_start_data
    from trainer.em import EMTrainer
    from workers.roles import model_path_for

    trainer = EMTrainer(cfg, {r: model_path_for(settings.models, r) for r in EMTrainer.ROLES})
    if not trainer.needs_cold_start():
        return
    n = cfg.cold_start.seeds
    with console.status(f"cold start: annotating {n} seeds, training p_θ and q_φ on them..."):
        data = cold_start_data(settings)
        updates = trainer.cold_start(data.seeds)
    publish(settings.kafka, bootstrap, MODELS, updates)
    console.print(
        f"cold start on {len(data.seeds)} annotated seeds: " + ", ".join(u.version for u in updates)
    )


def serve_newest(settings) -> None:
    """Every trained role starts on its newest checkpoint (a LoRA one on its base), not on the
    base model: a restarted factory goes on where its models were."""
    from trainer.checkpoints import CheckpointStore
    from workers.roles import Role

    store = CheckpointStore(settings.trainer.checkpoint_dir)
    for role in (Role.PROMPT_MODEL, Role.RATIONALE_MODEL, Role.SOLVER):
        newest = store.latest(role)
        if newest is not None:
            settings.models.role(role).model = str(newest.path)


def stage_names(stages: str | None, train: bool) -> list[str]:
    """The stages `up` runs: the data path (or ``stages``), and the trainer unless not ``train``."""
    names = [s.strip() for s in stages.split(",")] if stages else list(DATA_STAGES)
    if train:
        names += [n for n in TRAINER_STAGES if n not in names]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    return names


@app.command()
def worker(
    stage: Annotated[str, typer.Argument(help=f"Stage to run: {', '.join(STAGES)}.")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run one stage against a cluster; start as many copies as partitions allow to scale out."""
    from streams import metrics
    from streams.cluster import Cluster
    from workers.runtime import run_stages

    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    settings = load(config, bootstrap)
    require_cluster(settings)
    metrics.serve(settings.metrics.host, settings.metrics.port)
    cluster = Cluster.connect(settings.kafka, settings.embedded_broker)
    console.print(f"worker [bold]{stage}[/] on {cluster.bootstrap}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run_stages(
                settings, [make_stage(stage, settings)], cluster.bootstrap, until=until_signal
            )
        )


async def until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 9092,
    config: ConfigOpt = None,
) -> None:
    """Run the embedded Kafka-compatible broker in the foreground (for local multi-process
    runs)."""
    from streams.broker import EmbeddedBroker

    settings = load(config)
    with EmbeddedBroker(settings.embedded_broker, port=port or None) as b:
        console.print(f"broker ready: [cyan]{b.bootstrap_servers}[/]  (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(until_signal())


def publish_seeds(settings, bootstrap: str, source: str, limit: int | None) -> int:
    from streams.clients import publish
    from streams.topics import SEEDS
    from workers.seeds import load_seeds

    return publish(settings.kafka, bootstrap, SEEDS, load_seeds(source, "train", limit))
