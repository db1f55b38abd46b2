"""A worker process's life: set its stages up, run them in one Faust app, stop them cleanly.

The stage runtime is four modules beside this one (docs/runtime.md):

- workers/agent.py: the Faust app and one agent per stage (reads, chunks, sends, acknowledges);
- workers/pipeline.py: one chunk from bytes to encoded outputs, and the failure policy (no
  broker needed);
- workers/offsets.py: acknowledgement in offset order, so a commit never passes unsent outputs;
- workers/backoff.py: the retry of what fails for reasons outside a record.

On shutdown the agents stop taking input, records in process get ``worker.shutdown_grace_s`` to
finish, the finished prefix is committed, and the rest is redelivered to the next worker
(docs/runtime.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import faust

from streams import metrics
from workers import monitoring
from workers.agent import StageAgent, build_app
from workers.stage import Stage

if TYPE_CHECKING:
    from promptcot.settings import Settings

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A stage could not set up (a missing model, an unwritable folder): the process refuses to
    start instead of dead-lettering every record it reads."""


def setup_stages(stages: list[Stage]) -> None:
    """Set every stage up before joining any group: a stage that cannot start (a missing model,
    an unwritable folder) stops the process with one clear line."""
    for stage in stages:
        try:
            stage.ensure_ready()
        except Exception as exc:  # noqa: BLE001 - any set-up failure refuses the start
            raise StartupError(f"stage {stage.name} cannot start: {exc}") from exc


async def run_stages(
    settings: Settings,
    stages: list[Stage],
    bootstrap: str,
    *,
    app_id: str | None = None,
    until: Callable[[], Awaitable[None]] | None = None,
) -> list[Stage]:
    """Run ``stages`` in one Faust app until ``until()`` returns (default: forever), then drain.

    Each process joins one consumer group per app id; a single-stage worker gets its own group,
    so `promptcot worker generate` on ten machines splits the concept partitions ten ways.
    Every process that serves a model role also follows the models topic (workers/reload.py).
    """
    from workers.reload import ModelFollower
    from workers.stage import ModelStage

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, setup_stages, stages)
    group = app_id or f"{settings.kafka.consumer_group_prefix}-{'-'.join(s.name for s in stages)}"
    app = build_app(settings.kafka, bootstrap, group)
    agents: list[StageAgent] = []
    follower = None
    monitor = None
    try:  # whatever fails from here (an agent, the app's start) stops what started before it
        for stage in stages:
            agents.append(
                StageAgent(app, stage, settings.stage(stage.name), settings.worker, settings.kafka)
            )
        if any(isinstance(s, ModelStage) for s in stages):
            follower = ModelFollower(settings, bootstrap)
            follower.start()
        await app.start()
        # A stage stuck from its start is a stall too (ops/prometheus/alerts.yml).
        for stage in stages:
            metrics.LAST_PROGRESS.labels(stage=stage.name).set(time.time())
        monitor = asyncio.create_task(monitoring.monitor(settings, bootstrap, group, stages))
        if until is None:
            await asyncio.Event().wait()
        else:
            await until()
    finally:
        if monitor is not None:
            monitor.cancel()  # lag and health (workers/monitoring.py)
        await _shut_down(app, agents, settings.worker.shutdown_grace_s)
        if follower is not None:
            await follower.stop()
    return stages


async def _shut_down(app: faust.App, agents: list[StageAgent], grace_s: float) -> None:
    loop = asyncio.get_running_loop()

    def now() -> None:  # a second signal: leave at once; unfinished records are redelivered
        log.warning("second signal: exiting now")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, now)
    unfinished = await asyncio.gather(*(a.drain(grace_s) for a in agents))
    if any(unfinished):
        log.warning(
            "stopping with %d unfinished record(s); they will be redelivered", sum(unfinished)
        )
    with contextlib.suppress(Exception):
        await asyncio.wait_for(app.consumer.commit(), timeout=5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(app.stop(), timeout=5)
    for agent in agents:
        agent.close()
