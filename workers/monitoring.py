"""What a worker process reports about itself while the runtime runs its stages: the consumer lag
of its group on each stage's input topic (streams/lag.py) and its health, /healthz and /readyz
(streams/health.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from streams import lag
from streams.health import HEALTH
from workers.stage import Stage

if TYPE_CHECKING:
    from promptcot.settings import Settings


async def monitor(settings: Settings, bootstrap: str, group: str, stages: list[Stage]) -> None:
    """Run until cancelled, from the moment the runtime has started ``stages`` (setup done)."""
    HEALTH.started(
        asyncio.get_running_loop(),
        stall_after_s=settings.metrics.stall_after_s,
        loop_timeout_s=settings.metrics.loop_timeout_s,
    )
    try:
        await lag.watch(
            settings.kafka,
            bootstrap,
            group,
            {stage.name: stage.input for stage in stages},
            settings.metrics.lag_interval_s,
        )
        await asyncio.Event().wait()  # lag not measured: keep reporting health
    finally:
        HEALTH.stopped()
