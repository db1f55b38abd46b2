"""One lineage of versions per role: the role's trainable model in this process, shared by every
trainer of the role (the dpo and sft stages both train the solver), brought up to the role's
newest checkpoint before it trains when another trainer saved a newer one (weights and, through
the checkpoint, the optimiser state), and the lock that serialises a train-and-save per role: a
lock in the process, and a lock file in the role's checkpoint folder across processes.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from streams import memory
from trainer.checkpoints import Checkpoint, CheckpointStore

if TYPE_CHECKING:
    from trainer.role_models import RoleModel

log = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"  # a dot name: never a checkpoint, never pruned


class RoleLineage:
    def __init__(self, store: CheckpointStore, role: str):
        self.store = store
        self.role = role
        self.rm: RoleModel | None = None
        self._lock = threading.RLock()
        self._depth = 0
        memory.hold(self)

    def memory_components(self) -> list[tuple[str, Any]]:
        """The model held between windows, for the memory account (streams/memory.py)."""
        rm = self.rm
        return [(f"trainer {self.role}", rm.model)] if rm is not None else []

    @contextmanager
    def training(self) -> Iterator[None]:
        """Held while a window trains this role and saves its version. Under torchrun only
        rank 0 takes the lock file: the ranks train as one, in step with each other."""
        from trainer.role_models import distributed_rank

        with self._lock:
            if self._depth or distributed_rank() != 0:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            folder = self.store.role_dir(self.role)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / LOCK_FILE, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def model(self, load: Callable[[], RoleModel]) -> RoleModel:
        """The role's model in this process, (re)loaded by ``load`` when there is none yet or
        when the role's newest checkpoint is not the one it holds."""
        with self._lock:
            newest = self.store.latest(self.role)
            held = self.rm.checkpoint if self.rm is not None else None
            if self.rm is None or _version(newest) != _version(held):
                if self.rm is not None:
                    log.info(
                        "%s: %s is newer than the model in memory (%s): loading it",
                        self.role,
                        newest.version_string if newest else "?",
                        self.rm.version_string,
                    )
                self.rm = load()
            return self.rm

    def discard(self) -> None:
        """Forget the model in memory (it may hold an update no checkpoint has): the next
        ``model`` loads the newest checkpoint."""
        with self._lock:
            self.rm = None


def _version(ckpt: Checkpoint | None) -> int:
    return ckpt.version if ckpt is not None else 0


_LINEAGES: weakref.WeakValueDictionary[tuple[str, str], RoleLineage] = weakref.WeakValueDictionary()
_REGISTRY = threading.Lock()


def role_lineage(store: CheckpointStore, role: str) -> RoleLineage:
    """The lineage of ``role`` in ``store`` in this process (one, whichever trainer asks, while
    one of them holds it)."""
    key = (str(store.root.resolve()), role)
    with _REGISTRY:
        found = _LINEAGES.get(key)
        if found is None:
            found = _LINEAGES[key] = RoleLineage(store, role)
        return found
