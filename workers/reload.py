"""Hot reload: every process that serves a model role follows the models topic and moves its
roles to each new checkpoint the trainer announces.

The follower reads the topic without a consumer group: every process must see every update (a
broadcast), while the stages of a process share one group. It starts from the beginning of the
topic, so a process that (re)starts serves the newest announced version at once. Updates older
than the one applied are ignored (a redelivery, or two trainers racing), as are updates whose
folder was pruned or that fail to load (a corrupt checkpoint: the role keeps its weights and
takes the next update). A failing read of the topic is retried with backoff. Only roles this
process has loaded are reloaded; a backend shared with a role that did not change keeps its
weights: the moved role gets a copy of its own (BackendPool). Stages look their backend up per
batch, so what they emit next carries the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from llm.backends.base import Backend
from streams import memory, metrics, serde
from streams.records import ModelUpdate
from streams.topics import MODELS
from workers.backoff import Backoff

if TYPE_CHECKING:
    from promptcot.settings import Settings

log = logging.getLogger(__name__)


class ModelFollower:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str | None = None,
        backends: Mapping[str, Backend] | None = None,
    ):
        self.settings = settings
        self.bootstrap = bootstrap
        self._backends = backends  # role -> backend; None: this process's role backends
        self.applied: dict[str, int] = {}  # role -> version number now served
        self._task: asyncio.Task | None = None

    def apply(self, updates: list[ModelUpdate]) -> list[str]:
        """Serve the newest update of each role (blocking: loads weights). Returns the roles
        that moved."""
        newest: dict[str, ModelUpdate] = {}
        for update in updates:
            current = newest.get(update.role)
            if current is None or update.number >= current.number:
                newest[update.role] = update
        moved = []
        for role, update in newest.items():
            number = update.number
            if number <= self.applied.get(role, 0):
                continue
            if not Path(update.path).is_dir():
                log.warning(
                    "reload: %s %s: %s is gone (pruned?), ignored",
                    role,
                    update.version,
                    update.path,
                )
                continue
            try:
                reloaded = self._reload(role, update.path)
            except Exception:  # a corrupt checkpoint: keep the weights served, wait for the next
                log.exception("reload: %s %s could not be loaded, skipped", role, update.version)
                reloaded = False
            if reloaded:
                log.info("reload: %s now serves %s", role, update.version)
                metrics.MODEL_RELOADS.labels(role=role).inc()
                metrics.MODEL_VERSION.labels(role=role).set(number)
                moved.append(role)
            self.applied[role] = number
        if moved:
            memory.release()  # the weights and adapters just replaced go back to the system
        return moved

    def _reload(self, role: str, path: str) -> bool:
        if self._backends is not None:
            if role not in self._backends:
                return False
            self._backends[role].reload(path)
            return True
        from llm.roles import reload_role

        return reload_role(self.settings.models, role, path)

    # -- following the topic ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _follow(self) -> None:
        """Follow the topic for the life of the process: a broker that is away or a failing
        read is retried with backoff (updates already applied are ignored when read again)."""
        delays = Backoff(1.0, 60.0)
        while True:
            delay = delays.next()
            try:
                await self._follow_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "reload: following the models topic failed; retrying in %.0f s", delay
                )
            await asyncio.sleep(delay)

    async def _follow_once(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from streams.cluster import aiokafka_config

        kafka = self.settings.kafka
        topic = MODELS.full_name(kafka.namespace)
        consumer = AIOKafkaConsumer(
            **aiokafka_config(kafka, self.bootstrap or kafka.bootstrap_servers or ""),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        loop = asyncio.get_running_loop()
        try:
            await consumer.start()
            partitions = consumer.partitions_for_topic(topic) or {0}
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
            await consumer.seek_to_beginning()
            pending: list[ModelUpdate] = []
            since = time.monotonic()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                for messages in batches.values():
                    for message in messages:
                        try:
                            pending.append(serde.decode(message.value, ModelUpdate))
                        except serde.RecordDecodeError:
                            continue  # the model_update dead letters are the trainer's business
                # Apply once the topic is drained (or every 2 s under a stream of updates), so a
                # restart loads the newest version once, not every version in turn.
                if pending and (not batches or time.monotonic() - since > 2.0):
                    await loop.run_in_executor(None, self.apply, pending)
                    pending = []
                if not pending:
                    since = time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
