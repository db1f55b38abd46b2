"""Running the factory: everything in one process (`up`), one stage (`worker`), the broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
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
    err_console,
    load,
    parse_duration,
    require_cluster,
)
from promptcot.registry import STAGES
from promptcot.startup import (
    FACTORY_GROUP,
    ephemeral_overrides,
    make_stage,
    publish_seeds,
    serve_newest,
    stage_names,
    up_seeds,
    worker_group,
)

EphemeralOpt = Annotated[
    bool,
    typer.Option(
        "--ephemeral",
        help="Keep nothing: the broker in memory, the vector store and the sink in a temporary "
        "folder removed at exit (default: everything survives a restart).",
    ),
]


@app.command()
def up(
    max_problems: Annotated[int, typer.Option(help="Stop after this many verified problems.")] = 3,
    duration: Annotated[str, typer.Option(help="Stop after this long (e.g. 25m).")] = "25m",
    seeds: Annotated[
        int,
        typer.Option(
            help="Seed problems to publish for annotate (the EM loop's seed set; with the "
            "trainer on, the ones after the cold start's)."
        ),
    ] = 128,
    stages: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated stages, run as listed (default: the data path and the trainer)."
        ),
    ] = None,
    train: Annotated[
        bool,
        typer.Option(
            "--train/--no-train",
            help="Run the trainer stages (cold start, EM, DPO; sized by trainer.profile); "
            "--no-train: a pure generator.",
        ),
    ] = True,
    ephemeral: EphemeralOpt = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run the whole factory in one process: broker (embedded unless configured), every stage
    and the training loop, live counts, and a summary of what came out, where it is, and the
    model versions the trainer reached. A restart continues where the last run stopped (sampler
    position, committed offsets, problems, vector store, checkpoints)."""
    from promptcot.carryover import carried_over
    from promptcot.cli.supervise import Supervisor
    from promptcot.progress import FactoryProgress
    from promptcot.runlog import quiet_progress_bars
    from streams import health
    from streams.cluster import Cluster
    from workers.runtime import run_stages

    scratch = Path(tempfile.mkdtemp(prefix="promptcot-ephemeral-")) if ephemeral else None
    cluster = None
    # Whatever stops the run, the broker closes and an --ephemeral run's scratch folder goes.
    try:
        settings = load(config, bootstrap, **(ephemeral_overrides(scratch) if scratch else {}))
        quiet_progress_bars()  # model loads would print theirs into the live table
        names = stage_names(stages, train)
        limit_s = parse_duration(duration)
        # The time limit counts the cold start too.
        progress = FactoryProgress(started=time.monotonic())
        supervisor = Supervisor(
            settings.kafka,
            settings.worker.shutdown_grace_s,
            on_force=lambda: console.print(progress.table()),
        )
        health.serve(settings.metrics.host, settings.metrics.port)

        with console.status("starting broker and topics..."):
            cluster = Cluster.connect(settings.kafka, settings.embedded_broker)
        supervisor.watch(cluster)
        # Stages read the topics they restore from (the sampler's position) at this address.
        settings.kafka.bootstrap_servers = cluster.bootstrap
        where = "embedded broker" if cluster.broker else "cluster"
        if cluster.broker is not None:
            where += f" ({cluster.broker.data_dir})" if cluster.broker.durable else " (in memory)"
        console.print(
            f"[bold]PromptCoT factory[/] on {where} [cyan]{cluster.bootstrap}[/], "
            f"stages: {', '.join(names)}"
        )
        if settings.metrics.port:
            console.print(
                f"metrics: http://{settings.metrics.host}:{settings.metrics.port}/metrics"
            )
        progress.carried = carried_over(settings, cluster.bootstrap, FACTORY_GROUP)
        if (continued := progress.continued()) is not None:
            console.print(continued)
        if seeds and "annotate" in names:
            n = publish_seeds(settings.kafka, cluster.bootstrap, up_seeds(settings, names, seeds))
            console.print(f"published {n} seed problems for annotate/rationale")
        if "em" in names:
            cold_start_first(settings, cluster.bootstrap)
            serve_newest(settings)

        stop = asyncio.Event()

        async def until() -> None:
            supervisor.attach(stop)
            with Live(
                progress.table(), console=console, refresh_per_second=2, transient=True
            ) as live:
                while not stop.is_set():
                    live.update(progress.table())
                    if supervisor.check_cluster():
                        break
                    if progress.accepted() >= max_problems:
                        progress.stop_reason = f"{max_problems} verified problems"
                        break
                    if time.monotonic() - progress.started >= limit_s:
                        progress.stop_reason = f"time limit {duration}"
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=1.0)
                if not progress.stop_reason:
                    progress.stop_reason = supervisor.failure or "interrupted"
                live.update(progress.table())

        asyncio.run(
            run_stages(
                settings,
                [make_stage(n, settings) for n in names],
                cluster.bootstrap,
                app_id=FACTORY_GROUP,
                until=until,
            )
        )
    finally:
        if cluster is not None:
            cluster.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if supervisor.failure:
        err_console.print(f"[red]error:[/] {supervisor.failure}", highlight=False, soft_wrap=True)
    console.print(progress.summary(None if scratch else Path(settings.sink.output_dir)))
    # A model call still running in a stage thread cannot be interrupted and would hold the exit
    # for minutes; its input was never committed, so a next run redelivers it. Nothing is lost.
    sys.stdout.flush()
    os._exit(supervisor.exit_code)


def cold_start_first(settings, bootstrap: str) -> None:
    """The paper's cold start before anything generates, when p_θ, q_φ or the solver has no
    checkpoint yet (the em stage would run it too, but in one process it would share the CPU
    with every other stage, and generation would meanwhile run on the base model). Announced on
    the models topic."""
    import logging

    from promptcot.progress import ColdStartBar
    from promptcot.runlog import details_to, quiet_progress_bars
    from streams.clients import publish
    from streams.topics import MODELS
    from trainer.coldstart import cold_start, needs_cold_start, on_first_start
    from trainer.em import EMTrainer

    cfg = settings.trainer
    if not on_first_start(cfg):
        return
    trainer = EMTrainer.on_models(cfg, settings.models)
    if not needs_cold_start(settings, trainer):
        return
    quiet_progress_bars()
    log = Path(settings.sink.output_dir) / "logs" / "cold-start.log"
    # The console shows one bar; what Hugging Face and the trainer say goes to the log.
    with details_to(log), ColdStartBar(console) as bar:
        try:
            done = cold_start(settings, trainer, report=bar)
        except Exception as e:  # noqa: BLE001 (as the em stage: the loop runs from the base models)
            # to the log only (a warning): the console's line below is the one line it gets
            logging.getLogger(__name__).warning("the cold start failed", exc_info=True)
            failure = f"{type(e).__name__}: {e}".splitlines()[0]
        else:
            failure = None
    if failure is not None:
        console.print(
            f"[yellow]the cold start failed ({failure}); EM starts from the base models[/] "
            f"(details: {log})",
            highlight=False,
            soft_wrap=True,
        )
        return
    if done is None:  # every model has a checkpoint already
        return
    publish(settings.kafka, bootstrap, MODELS, done.updates)
    console.print(
        f"cold start on {len(done.data.seeds)} annotated seeds: "
        + ", ".join(u.version for u in done.updates)
        + f" (details: {log})",
        highlight=False,
    )


@app.command(
    epilog="Stages: " + "; ".join(f"{name}: {spec.doc}" for name, spec in STAGES.items()) + "."
)
def worker(
    stage: Annotated[str, typer.Argument(help=f"Stage to run: {', '.join(STAGES)}.")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Run one stage against a cluster; start as many copies as partitions allow to scale out.
    Sampler replicas need distinct `concepts.seed` values; each reads every verdict. SIGTERM
    stops it within a deadline; a cluster gone for `kafka.unreachable_exit_s` ends it with one
    line and a non-zero exit (the orchestrator restarts it)."""
    from promptcot.cli.supervise import Supervisor
    from streams import health
    from streams.cluster import Cluster
    from workers.runtime import run_stages

    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    settings = load(config, bootstrap)
    require_cluster(settings)
    supervisor = Supervisor(settings.kafka, settings.worker.shutdown_grace_s, lambda: None)
    health.serve(settings.metrics.host, settings.metrics.port)
    cluster = Cluster.connect(settings.kafka, settings.embedded_broker)
    supervisor.watch(cluster)
    console.print(f"worker [bold]{stage}[/] on {cluster.bootstrap}")
    group = worker_group(stage, settings.kafka, settings.concepts)

    async def until() -> None:
        stop = asyncio.Event()
        supervisor.attach(stop)
        while not stop.is_set() and not supervisor.check_cluster():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)

    asyncio.run(
        run_stages(
            settings, [make_stage(stage, settings)], cluster.bootstrap, app_id=group, until=until
        )
    )
    if supervisor.failure:
        err_console.print(f"[red]error:[/] {supervisor.failure}", highlight=False, soft_wrap=True)
    else:
        console.print(f"worker [bold]{stage}[/] stopped")
    # Records still inside a model call were not committed: the next worker redoes them. A
    # thread stuck in such a call must not hold the exit past the grace period.
    sys.stdout.flush()
    os._exit(supervisor.exit_code)


async def until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: a free one).")] = 9092,
    ephemeral: EphemeralOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Run the embedded Kafka-compatible broker in the foreground (for local multi-process
    runs). Topics and committed offsets are kept in `embedded_broker.data_dir` unless
    --ephemeral."""
    from streams.broker import EmbeddedBroker

    settings = load(config)
    data_dir = (
        None
        if ephemeral or settings.embedded_broker.ephemeral
        else settings.embedded_broker.data_dir
    )
    with EmbeddedBroker(settings.embedded_broker, port=port or None, data_dir=data_dir) as b:
        kept = f"data in {b.data_dir}" if b.durable else "in memory"
        console.print(f"broker ready: [cyan]{b.bootstrap_servers}[/] ({kept}; Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(until_signal())
