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
PRUNED = "pruned.jsonl"  # manifests of pruned checkpoints, one JSON object a line
_NAME = re.compile(r"^v(\d{4,})-([A-Za-z0-9_.]+)$")
_STALE_TMP_S = 3600.0  # temporary folders older than this belong to a crashed writer


@dataclass(frozen=True)
class Checkpoint:
    role: str
    version: int
    step: str  # "cold_start" | "e_step" | "m_step" | "dpo"
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
        # An adapter's base folder stays as long as the adapter does.
        needed = {
            str(c.metadata.get("base_model")) for c in ckpts[-keep:] if c.metadata.get("adapter")
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


def training_device(device: str = "auto") -> str:
    """The torch device training runs on: ``auto`` is cuda when available (this process's GPU
    under torchrun / accelerate launch: ``LOCAL_RANK``), else cpu."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def distributed_rank() -> int:
    """This process's rank in a torchrun / accelerate launch (0 when not launched so)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_role_model(
    store: CheckpointStore,
    role: str,
    base_path: str,
    *,
    use_lora: bool = False,
    lora: Any = None,
    dtype: str = "float32",
    device: str = "auto",
) -> RoleModel:
    """The newest checkpoint of ``role`` if there is one (a restarted trainer resumes), else the
    base folder; wrapped in a fresh LoRA adapter when ``use_lora`` and it has none yet; on the
    training device, so scoring and decoding run where the HF Trainer trains.

    Weights that train stay float32 (bf16 master weights would round EM-sized updates, lr 2e-6,
    away); ``dtype`` bfloat16 loads a frozen LoRA base (``use_lora``) in bf16 and trains under
    bf16 autocast (trainer/sft.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = store.latest(role)
    adapter = ckpt is not None and ckpt.is_adapter
    # Only a base that stays frozen under an adapter loads in ``dtype``: an adapter merged away
    # (LoRA switched off) leaves a model full fine-tuning trains, so its base loads float32.
    load_dtype = getattr(torch, dtype) if use_lora else torch.float32
    if adapter:
        assert ckpt is not None
        base_path = str(ckpt.metadata.get("base_model") or base_path)
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=load_dtype, local_files_only=True
        )
        model = PeftModel.from_pretrained(model, str(ckpt.path), is_trainable=True)
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    else:
        source = str(ckpt.path) if ckpt is not None else base_path
        if ckpt is not None:
            base_path = source  # full weights: the newest folder is the base for new adapters
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=load_dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = apply_lora_setting(model, use_lora, lora)
    model.to(training_device(device))
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
        import torch
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):  # the same adapter init every run
            torch.manual_seed(0)
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
    parent_ids: list[str] | None = None,
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
        "parent_ids": list(parent_ids or []),
    }
    # Several processes training one model (data parallel): rank 0 writes the version, the
    # others wait for it and take it as theirs (docs/training.md, "Several GPUs").
    if distributed_rank() == 0:
        ckpt = store.save(rm.role, step, write, meta)
        _barrier()
    else:
        _barrier()
        ckpt = store.latest(rm.role)  # type: ignore[assignment]
        assert ckpt is not None and ckpt.step == step, "rank 0 wrote no checkpoint"
    rm.checkpoint = ckpt
    return ckpt


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
