"""Versioned, atomic checkpoints per model role.

Layout: ``<dir>/<role>/v0001-<step>/`` holding the weights (a full HF folder or a LoRA adapter
folder), the tokenizer and ``checkpoint.json``. A checkpoint is written into a hidden temporary
folder next to its final place and renamed into place once complete, so a reader (a generator
reloading, a restarted trainer) never sees half a checkpoint: a folder without the leading dot
is always whole. ``checkpoint.json`` is written last inside the temporary folder as a second
guard (``latest`` ignores folders without it).
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
                meta = {
                    "role": role,
                    "version": version,
                    "step": step,
                    "created_at": time.time(),
                    "writer": uuid.uuid4().hex[:8],
                    **(metadata or {}),
                }
                (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
                final = base / f"v{version:04d}-{step}"
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

    def prune(self, role: str, keep_last: int | None = None) -> list[Path]:
        """Delete all but the newest ``keep_last`` checkpoints (and stale temporary folders).
        Returns what was deleted."""
        keep = max(1, keep_last or self.keep_last)
        removed = []
        ckpts = self.list(role)
        # An adapter's base folder stays as long as the adapter does.
        needed = {
            str(c.metadata.get("base_model")) for c in ckpts[-keep:] if c.metadata.get("adapter")
        }
        for ckpt in ckpts[:-keep]:
            if str(ckpt.path) in needed:
                continue
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


# ---------------------------------------------------------------------------------------------
# Model folders: what a checkpoint holds and how a trainer resumes from it. torch, transformers
# and peft are imported lazily so reading the store (e.g. a reload stage) stays light.


@dataclass
class RoleModel:
    """A role's trainable model in memory, with where it came from."""

    role: str
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any
    base_path: str  # the full model folder LoRA adapters sit on
    checkpoint: Checkpoint | None = None  # None: still the base weights

    @property
    def version_string(self) -> str:
        return self.checkpoint.version_string if self.checkpoint else f"{self.role}/base"


def load_role_model(
    store: CheckpointStore, role: str, base_path: str, *, use_lora: bool = False, lora: Any = None
) -> RoleModel:
    """The newest checkpoint of ``role`` if there is one (a restarted trainer resumes), else the
    base folder; wrapped in a fresh LoRA adapter when ``use_lora`` and it has none yet."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float32 master weights: a bf16 folder (the prepared SmolLM2) would round EM-sized updates
    # (lr 2e-6) away entirely.
    dtype = torch.float32
    ckpt = store.latest(role)
    if ckpt is not None and ckpt.is_adapter:
        base_path = str(ckpt.metadata.get("base_model") or base_path)
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, local_files_only=True)
        model = PeftModel.from_pretrained(model, str(ckpt.path), is_trainable=True)
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    else:
        source = str(ckpt.path) if ckpt is not None else base_path
        if ckpt is not None:
            base_path = source  # full weights: the newest folder is the base for new adapters
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = apply_lora_setting(model, use_lora, lora)
    normalize_end_of_turn(tokenizer)
    return RoleModel(role, model, tokenizer, base_path, ckpt)


def normalize_end_of_turn(tokenizer: Any) -> None:
    """Make ``eos_token`` the chat end-of-turn token. TRL appends ``eos_token`` to every
    completion, so it must be what ends an assistant turn; the SmolLM2 folder converted from
    GGUF says ``<|im_start|>`` there, which would teach the model to open a new turn instead of
    closing its own. Saved checkpoints carry the corrected tokenizer."""
    im_end = "<|im_end|>"
    if im_end in tokenizer.get_vocab() and tokenizer.eos_token != im_end:
        log.info("tokenizer eos_token %r -> %r (ChatML end of turn)", tokenizer.eos_token, im_end)
        tokenizer.eos_token = im_end
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def apply_lora_setting(model: Any, use_lora: bool, lora: Any) -> Any:
    """Add an adapter when LoRA is on and the model has none; merge it away when LoRA was
    switched off (the next checkpoint is then a full folder)."""
    from peft import PeftModel

    if use_lora and not isinstance(model, PeftModel):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)
    if not use_lora and isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_role_model(
    store: CheckpointStore,
    rm: RoleModel,
    step: str,
    metrics: dict[str, float] | None = None,
    trained_ids: list[str] | None = None,
) -> Checkpoint:
    """Publish ``rm`` as the role's next version: a full HF folder, or an adapter folder whose
    manifest names its base (backends load base + adapter)."""
    from peft import PeftModel

    is_adapter = isinstance(rm.model, PeftModel)

    def write(tmp: Path) -> None:
        rm.model.save_pretrained(str(tmp))
        rm.tokenizer.save_pretrained(str(tmp))

    meta: dict[str, Any] = {
        "adapter": is_adapter,
        "base_model": rm.base_path,
        "parent": rm.version_string,
        "metrics": metrics or {},
        # The input records this version was trained on: a window redelivered after a crash
        # (checkpoint written, offsets not yet committed) is recognised and not trained twice.
        "trained_ids": list(trained_ids or []),
    }
    ckpt = store.save(rm.role, step, write, meta)
    rm.checkpoint = ckpt
    return ckpt


class SeenRecords:
    """Ids of records already trained on (bounded, oldest forgotten first). Seeded from the
    newest checkpoints' manifests so a restarted trainer recognises a redelivered window."""

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._ids: dict[str, None] = {}

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._ids

    def add(self, ids: list[str]) -> None:
        for i in ids:
            self._ids[i] = None
        while len(self._ids) > self.limit:
            self._ids.pop(next(iter(self._ids)))

    def load(self, store: CheckpointStore, roles: list[str]) -> None:
        for role in roles:
            for ckpt in store.list(role):
                self.add([str(i) for i in ckpt.metadata.get("trained_ids", [])])
