"""One frozen copy of a base model's weights per process, under as many role models as need it.

On the CPU profile every role is a LoRA adapter on the same base (SmolLM2-135M: ~540 MB in
float32), and a process holds several roles at once: the served p_θ, q_φ and solver, the
trainer's trainable copies of them, an eval of a new version. Each gets its own model object
from ``role_model``: its own module tree (its own train/eval flags, adapters, active adapter,
config and generation config), whose parameters and buffers alias the tensors of one frozen copy
per (base folder, dtype, device). One tensor storage, any number of adapters.

How a role model is built: the registry loads the base once (``from_pretrained``) and keeps that
model as a template that is never handed out, wrapped or trained; a role model is a deep copy of
the template whose memo maps every parameter to a new frozen ``Parameter`` on the same storage
(so ``requires_grad`` stays per model) and every buffer and tensor attribute to the template's
own tensor (rotary ``inv_freq`` is a non-persistent buffer: it is not in the state dict, and
a model built on the meta device and loaded with ``load_state_dict(assign=True)`` would keep it
on meta). Tied weights stay tied: the template's tied parameter is one object, so the memo maps
it once.

Rules that keep the base shared and unchanged:
- a base is never merged into: an adapter that must be merged (LoRA switched off, full
  fine-tuning) goes on a private copy (``private_model``);
- nothing trains a shared tensor: ``assert_frozen`` refuses a model whose shared parameters
  require grad;
- the registry holds its bases weakly: every role model holds its base, and a base nobody
  uses any more is freed.

Full fine-tuning (the GPU profile) trains every weight: nothing is shared there, and the
trainer loads a private float32 copy (docs/models.md, "Where the weights are").
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams import memory

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class BaseKey:
    """What makes two bases the same copy: the folder, the dtype and the device of the tensors."""

    path: str
    dtype: str
    device: str

    def __str__(self) -> str:
        return f"{Path(self.path).name} ({self.dtype}, {self.device})"


class SharedBase:
    """A frozen copy of one base model's weights, and the role models built on it."""

    shares = True  # the memory account counts these tensors here, and as shared in every user

    def __init__(self, key: BaseKey):
        import torch
        from transformers import AutoModelForCausalLM

        self.key = key
        template = AutoModelForCausalLM.from_pretrained(
            key.path, dtype=getattr(torch, key.dtype), local_files_only=True
        )
        template.to(key.device).eval()
        template.requires_grad_(False)
        self._template = template
        self._version: str | None = None
        self._lock = threading.Lock()
        memory.hold(self)

    def memory_components(self) -> list[tuple[str, Any]]:
        return [(f"shared base {self.key}", self._template)]

    def __deepcopy__(self, memo: dict) -> SharedBase:
        # A deep copy of a role model (e.g. a reference model made by copying the policy) must
        # not copy the whole base through the reference every role model holds.
        return self

    @property
    def version(self) -> str:
        """``<folder>@<hash of its weight files>`` (llm/backends/base.py), hashed once."""
        with self._lock:
            if self._version is None:
                from llm.backends.base import weights_version

                self._version = weights_version(self.key.path)
            return self._version

    def tensors(self) -> list[Any]:
        """Every tensor of the copy (parameters, buffers, tensor attributes), each once."""
        seen: dict[int, Any] = {}
        for module in self._template.modules():
            for tensor in _module_tensors(module):
                seen.setdefault(id(tensor), tensor)
        return list(seen.values())

    def storage_ptrs(self) -> set[int]:
        """The data pointers of the copy's storages (a tensor aliases the base when its storage
        is one of these)."""
        return {t.untyped_storage().data_ptr() for t in self.tensors()}

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in self.tensors()}
        return sum(s.nbytes() for s in storages.values())

    def model(self) -> Any:
        """A new model object of its own on this base's tensors (frozen)."""
        import torch

        memo: dict[int, Any] = {}
        for module in self._template.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in memo:
                    memo[id(param)] = torch.nn.Parameter(param, requires_grad=False)
            for tensor in _module_tensors(module):
                memo.setdefault(id(tensor), tensor)
        model = copy.deepcopy(self._template, memo)
        model.eval()
        # Holding the base keeps it in the registry for as long as a model uses it.
        model.__dict__[_BASE_ATTR] = self
        return model


_BASE_ATTR = "_promptcot_shared_base"


def _module_tensors(module: Any) -> list[Any]:
    """A module's own tensors: parameters, buffers (persistent or not) and tensor attributes."""
    import torch

    out = [p for p in module._parameters.values() if p is not None]
    out += [b for b in module._buffers.values() if b is not None]
    out += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    return out


_bases: weakref.WeakValueDictionary[BaseKey, SharedBase] = weakref.WeakValueDictionary()
_registry_lock = threading.Lock()
_loading: dict[BaseKey, threading.Lock] = {}


def base_key(path: str | Path, dtype: str = "float32", device: str = "cpu") -> BaseKey:
    """The registry key: the resolved folder, a concrete dtype ("auto": the folder's own) and a
    device with its index ("cuda" is the current CUDA device)."""
    import torch

    folder = Path(path).resolve()
    if dtype == "auto":
        dtype = _config_dtype(folder)
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(_DTYPES)} or auto")
    where = torch.device(device)
    if where.type == "cuda" and where.index is None:
        where = torch.device("cuda", torch.cuda.current_device())
    return BaseKey(str(folder), dtype, str(where))


def _config_dtype(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    found = config.get("dtype") or config.get("torch_dtype") or "float32"
    return found if found in _DTYPES else "float32"


def shared_base(path: str | Path, dtype: str = "float32", device: str = "cpu") -> SharedBase:
    """The process's copy of this base, loaded on first use (one load even when several
    threads ask at once)."""
    key = base_key(path, dtype, device)
    with _registry_lock:
        base = _bases.get(key)
        if base is not None:
            return base
        loading = _loading.setdefault(key, threading.Lock())
    with loading:
        with _registry_lock:
            base = _bases.get(key)
        if base is None:
            base = SharedBase(key)
            with _registry_lock:
                _bases[key] = base
    with _registry_lock:
        _loading.pop(key, None)
    return base


def role_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """A model of its own for one role on the shared frozen copy of ``path``: put an adapter on
    it (peft), never merge one into it."""
    return shared_base(path, dtype, device).model()


def private_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> Any:
    """A copy of ``path`` that belongs to its caller: what full fine-tuning trains, and what an
    adapter is merged into."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), local_files_only=True
    )
    return model.to(device)


def base_of(model: Any) -> SharedBase | None:
    """The shared base a model (or a peft wrapper around one) sits on; None: a private model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "__dict__", {}).get(_BASE_ATTR)


def live_bases() -> list[SharedBase]:
    """The bases this process holds now."""
    with _registry_lock:
        return list(_bases.values())


class SharedWeightsError(RuntimeError):
    """A shared base's tensor would be trained or written."""


def assert_frozen(model: Any) -> None:
    """Refuse a model that would train a tensor of a shared base (every model using that base
    would change)."""
    base = base_of(model)
    if base is None:
        return
    shared = base.storage_ptrs()
    for name, param in model.named_parameters():
        if param.requires_grad and param.untyped_storage().data_ptr() in shared:
            raise SharedWeightsError(
                f"{name} is a weight of the shared base {base.key} and requires grad: train an "
                "adapter on it, or load a private copy (full fine-tuning)"
            )
