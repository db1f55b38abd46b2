"""A role's model in memory and its folders on disk: loading the newest checkpoint of a role (or
its base) onto the training device, with or without a LoRA adapter, and publishing it as the
role's next version in the checkpoint store (trainer/checkpoints.py). torch, transformers and peft
are imported when called, so importing this stays light.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.checkpoints import Checkpoint, CheckpointStore

log = logging.getLogger(__name__)


@dataclass
class RoleModel:
    """A role's trainable model in memory, with where it came from."""

    role: str
    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any
    base_path: str  # the full model folder LoRA adapters sit on
    checkpoint: Checkpoint | None = None  # None: still the base weights
    # The role's optimiser (trainer/engine.py, RoleOptimizer): taken back from the checkpoint
    # on first training, saved with every version.
    optimizer: Any = None

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
    training device, so scoring and decoding run where training runs.

    With LoRA the adapter trains on the process's one frozen copy of the base, the copy the
    served roles and the other trainers use too (llm/shared_base.py): a trainable copy costs its
    adapter, not a base. Without LoRA (full fine-tuning) the model is a private copy.

    Weights that train stay float32 (bf16 master weights would round EM-sized updates, lr 2e-6,
    away); ``dtype`` bfloat16 loads a frozen LoRA base (``use_lora``) in bf16 and trains under
    bf16 autocast (trainer/engine.py)."""
    from transformers import AutoTokenizer

    from llm.shared_base import assert_frozen, private_model, role_model

    ckpt = store.latest(role)
    adapter = ckpt is not None and ckpt.is_adapter
    where = training_device(device)
    # Only a base that stays frozen under an adapter loads in ``dtype``, and it is the shared
    # one: an adapter merged away (LoRA switched off) leaves a model full fine-tuning trains, so
    # it merges into a private float32 copy.
    if adapter:
        assert ckpt is not None
        base_path = str(ckpt.metadata.get("base_model") or base_path)
        from peft import PeftModel

        if use_lora:
            model = PeftModel.from_pretrained(
                role_model(base_path, dtype, where), str(ckpt.path), is_trainable=True
            )
        else:
            on_private = private_model(base_path, "float32", where)
            model = PeftModel.from_pretrained(on_private, str(ckpt.path)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
    else:
        source = str(ckpt.path) if ckpt is not None else base_path
        if ckpt is not None:
            base_path = source  # full weights: the newest folder is the base for new adapters
        if use_lora:
            model = role_model(source, dtype, where)
        else:
            model = private_model(source, "float32", where)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = apply_lora_setting(model, use_lora, lora)
    assert_frozen(model)
    normalize_end_of_turn(tokenizer)
    return RoleModel(role, model, tokenizer, base_path, ckpt)


def load_frozen(path: str, dtype: str = "float32", device: str = "auto") -> Any:
    """A model folder (or an adapter folder, merged onto the base it names) loaded for
    inference only: in ``dtype``, frozen, in eval mode, on the training device (DPO's anchor
    beside a fully fine-tuned policy: trainer/anchor.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.backends.base import adapter_base

    base = adapter_base(path)
    model = AutoModelForCausalLM.from_pretrained(
        base or path, dtype=getattr(torch, dtype), local_files_only=True
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model.requires_grad_(False)
    return model.to(training_device(device)).eval()


def normalize_end_of_turn(tokenizer: Any) -> None:
    """Make ``eos_token`` the chat end-of-turn token. Training appends ``eos_token`` to every
    completion (trainer/engine.py, ``with_eos``), so it must be what ends an assistant turn;
    the SmolLM2 folder converted from GGUF says ``<|im_start|>`` there, which would teach the
    model to open a new turn instead of closing its own. Saved checkpoints carry the corrected
    tokenizer."""
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
        from llm.shared_base import SharedWeightsError, base_of

        if base_of(model) is not None:  # merging would change every model on that base
            raise SharedWeightsError(
                "LoRA switched off on a model over a shared base: load a private copy to merge "
                "into (load_role_model does)"
            )
        return model.merge_and_unload()
    return model


def save_role_model(
    store: CheckpointStore,
    rm: RoleModel,
    step: str,
    metrics: dict[str, float] | None = None,
    trained_ids: list[str] | None = None,
    parent_ids: list[str] | None = None,
    *,
    manifest: dict[str, Any] | None = None,
    save_optimizer: bool = True,
) -> Checkpoint:
    """Publish ``rm`` as the role's next version: a full HF folder, or an adapter folder whose
    manifest names its base (backends load base + adapter), with the role's optimiser state
    beside the weights (``save_optimizer`` False: its step count only, no moments).
    ``manifest`` adds keys to ``checkpoint.json``."""
    from peft import PeftModel

    from trainer.engine import save_train_state

    is_adapter = isinstance(rm.model, PeftModel)

    def write(tmp: Path) -> None:
        if is_adapter:  # the trained adapter only, never a frozen one beside it (DPO's anchor)
            rm.model.save_pretrained(str(tmp), selected_adapters=["default"])
        else:
            rm.model.save_pretrained(str(tmp))
        rm.tokenizer.save_pretrained(str(tmp))
        save_train_state(rm, tmp, save_optimizer)

    meta: dict[str, Any] = {
        "adapter": is_adapter,
        "base_model": rm.base_path,
        "parent": rm.version_string,
        "metrics": metrics or {},
        # The input records this version was trained on: a window redelivered after a crash
        # (checkpoint written, offsets not yet committed) is recognised and not trained twice.
        "trained_ids": list(trained_ids or []),
        "parent_ids": list(parent_ids or []),
        **(manifest or {}),
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
