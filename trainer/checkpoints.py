"""Versioned, atomic checkpoints per model role, and what each version was trained on. Torch-free:
reading the store (a reload follower, `promptcot up` choosing the newest weights) stays light;
the model a checkpoint holds is loaded and saved by trainer/role_models.py.

Layout: ``<dir>/<role>/v0001-<step>/`` holding the weights (a full HF folder or a LoRA adapter
folder), the tokenizer, the role's optimiser state (``optimizer.pt``, ``trainer_state.json``:
trainer/engine.py; backends load only the weights) and ``checkpoint.json``. A checkpoint is
written into a hidden temporary folder next to its final place and renamed into place once
complete, so a reader (a generator reloading, a restarted trainer) never sees half a
checkpoint: a folder without the leading dot is always whole. ``checkpoint.json`` is written
last inside the temporary folder as a second guard (``latest`` ignores folders without it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
PRUNED = "pruned.jsonl"  # manifests of pruned checkpoints, one JSON object a line
_NAME = re.compile(r"^v(\d{4,})-([A-Za-z0-9_.]+)$")
_STALE_TMP_S = 3600.0  # temporary folders older than this belong to a crashed writer


@dataclass(frozen=True)
class Checkpoint:
    role: str
    version: int
    step: str  # "cold_start" | "e_step" | "m_step" | "dpo" | "sft"
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tag(self) -> str:
        return f"v{self.version:04d}-{self.step}"

    @property
    def version_string(self) -> str:
        """Stamped on ModelUpdate.version and record lineage: ``<role>/v0007-m_step``."""
        return f"{self.role}/{self.tag}"

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()


class CheckpointStore:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    def role_dir(self, role: str) -> Path:
        return self.root / role

    def list(self, role: str) -> list[Checkpoint]:
        """Complete checkpoints of a role, oldest first."""
        base = self.role_dir(role)
        if not base.is_dir():
            return []
        found = []
        for child in base.iterdir():
            m = _NAME.match(child.name)
            manifest = child / MANIFEST
            if not (m and child.is_dir() and manifest.is_file()):
                continue
            try:
                meta = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            found.append(Checkpoint(role, int(m.group(1)), m.group(2), child, meta))
        return sorted(found, key=lambda c: c.version)

    def latest(self, role: str) -> Checkpoint | None:
        ckpts = self.list(role)
        return ckpts[-1] if ckpts else None

    def _next_version(self, role: str) -> int:
        # Counts every versioned folder, complete or not, so a number is never reused.
        base = self.role_dir(role)
        numbers = [int(m.group(1)) for c in base.iterdir() if (m := _NAME.match(c.name))]
        numbers += [int(meta["version"]) for meta in self.manifests(role)]
        return max(numbers, default=0) + 1

    def save(
        self,
        role: str,
        step: str,
        write: Callable[[Path], None],
        metadata: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Call ``write(tmp_dir)`` to fill a temporary folder, then publish it atomically as the
        next version. A failing ``write`` leaves nothing behind."""
        if not re.fullmatch(r"[A-Za-z0-9_.]+", step):
            raise ValueError(f"bad step name {step!r}")
        base = self.role_dir(role)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{step}-", dir=base))
        try:
            write(tmp)
            for _ in range(100):  # another writer may take a number between our read and rename
                version = self._next_version(role)
                final = base / f"v{version:04d}-{step}"
                meta = {
                    "role": role,
                    "version": version,
                    "step": step,
                    "path": str(final),
                    "created_at": time.time(),
                    "writer": uuid.uuid4().hex[:8],
                    **(metadata or {}),
                }
                (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
                try:
                    # mkdir claims the name (fails if it exists); rename onto an empty dir is
                    # atomic on POSIX, so readers see either nothing or the whole checkpoint.
                    final.mkdir()
                except FileExistsError:
                    continue
                os.rename(tmp, final)
                _fsync_dir(base)
                ckpt = Checkpoint(role, version, step, final, meta)
                log.info("saved checkpoint %s at %s", ckpt.version_string, final)
                self.prune(role)
                return ckpt
            raise RuntimeError(f"could not claim a checkpoint version for {role}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def pruned_log(self, role: str) -> Path:
        return self.role_dir(role) / PRUNED

    def manifests(self, role: str) -> list[dict[str, Any]]:
        """Manifests of every checkpoint the role ever had, oldest first: the pruned ones (from
        the log ``prune`` keeps) and the complete ones on disk."""
        out: dict[int, dict[str, Any]] = {}
        log_path = self.pruned_log(role)
        if log_path.is_file():
            for line in log_path.read_text().splitlines():
                try:
                    meta = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-append
                if isinstance(meta, dict) and isinstance(meta.get("version"), int):
                    out[meta["version"]] = meta
        for ckpt in self.list(role):
            out[ckpt.version] = {**ckpt.metadata, "path": str(ckpt.path)}
        return [out[v] for v in sorted(out)]

    def prune(self, role: str, keep_last: int | None = None) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints (and stale temporary folders);
        their manifests are appended to ``pruned.jsonl`` first, so what each version was
        trained on outlives its weights. Returns what was deleted."""
        keep = max(1, keep_last or self.keep_last)
        removed = []
        ckpts = self.list(role)
        # An adapter's base folder stays as long as the adapter does, and a DPO version's
        # anchor (trainer/anchor.py) as long as the version that names it.
        needed = {
            str(c.metadata.get("base_model")) for c in ckpts[-keep:] if c.metadata.get("adapter")
        }
        needed |= {
            str(c.metadata["anchor"].get("path"))
            for c in ckpts[-keep:]
            if isinstance(c.metadata.get("anchor"), dict)
        }
        for ckpt in ckpts[:-keep]:
            if str(ckpt.path) in needed:
                continue
            with self.pruned_log(role).open("a") as log_file:
                log_file.write(json.dumps({**ckpt.metadata, "path": str(ckpt.path)}) + "\n")
            # Rename first: the folder leaves the versioned namespace at once, then is deleted.
            doomed = ckpt.path.with_name(f".del-{ckpt.path.name}-{uuid.uuid4().hex[:6]}")
            try:
                os.rename(ckpt.path, doomed)
            except OSError:
                continue  # someone else pruned it
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(ckpt.path)
        now = time.time()
        base = self.role_dir(role)
        if base.is_dir():
            for child in base.iterdir():
                if child.name.startswith((".tmp-", ".del-")):
                    try:
                        stale = now - child.stat().st_mtime > _STALE_TMP_S
                    except OSError:
                        continue
                    if stale or child.name.startswith(".del-"):
                        shutil.rmtree(child, ignore_errors=True)
        return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TrainedLedger:
    """Which checkpoint of a role trained on which input record, from the manifests of every
    checkpoint the role ever had (pruned ones included): a window redelivered after a crash is
    recognised, even by a restarted trainer, and the versions it produced are announced again
    instead of trained twice. Bounded: the oldest ids are forgotten first."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._by_role: dict[str, dict[str, dict[str, Any]]] = {}

    @classmethod
    def load(cls, store: CheckpointStore, roles: list[str]) -> TrainedLedger:
        ledger = cls()
        for role in roles:
            for meta in store.manifests(role):
                ledger.add(role, meta)
        return ledger

    def add(self, role: str, manifest: dict[str, Any]) -> None:
        ids = self._by_role.setdefault(role, {})
        for record_id in manifest.get("trained_ids", []):
            ids[str(record_id)] = manifest
        while len(ids) > self.limit:
            ids.pop(next(iter(ids)))

    def get(self, role: str, record_id: str) -> dict[str, Any] | None:
        """The manifest of the checkpoint of ``role`` that trained on ``record_id``, if any."""
        return self._by_role.get(role, {}).get(record_id)

    def manifests_for(self, role: str, record_ids: list[str]) -> list[dict[str, Any]]:
        """The distinct manifests that trained on any of ``record_ids``, oldest first."""
        found = {}
        for record_id in record_ids:
            meta = self.get(role, record_id)
            if meta is not None:
                found[meta["version"]] = meta
        return [found[v] for v in sorted(found)]
