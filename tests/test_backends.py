"""Backends on the real tiny model: the in-process transformers backend, and the OpenAI-compatible
HTTP backend against a real loopback server that speaks the completions protocol (backed by the
transformers backend), plus unreachable / slow / flaky endpoints."""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llm import prompts as P
from llm.backends import (
    BackendPool,
    BackendSettings,
    BackendTimeoutError,
    UnreachableError,
    clear_cache,
    make_backend,
    render_chat,
)
from llm.backends.openai_backend import OpenAIBackend
from llm.backends.transformers_backend import TransformersBackend
from llm.roles import ModelRoles
from verification.mathcheck import extract_answer

MAX_LEN = 512


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return TransformersBackend(BackendSettings(model=str(tiny_model_dir), max_model_len=MAX_LEN))


@pytest.fixture(scope="module")
def synth_prompt(backend):
    return P.SYNTHESIS.render(
        backend,
        **P.synthesis_fields(
            ["addition of whole numbers", "combining two groups", "counting objects"],
            "AIME",
            "math",
        ),
    )


@pytest.fixture(scope="module")
def solve_prompt(backend):
    return P.SOLVER_MATH.render(
        backend,
        problem="Ana has 3 apples. Ana gets 4 more apples. How many apples does Ana have now?",
    )


# -- transformers: generation ------------------------------------------------------------------


def test_chat_template_of_the_model_matches_the_prompt_layer(backend):
    assert render_chat(backend, "s", "u", "p") == render_chat(None, "s", "u", "p")
    assert render_chat(backend.tokenizer, "s", "u") == render_chat(None, "s", "u")


def test_generate_n_samples_and_seed_determinism(backend, solve_prompt, synth_prompt):
    prompts = [solve_prompt, synth_prompt]
    a = backend.generate(prompts, n=3, temperature=1.0, max_tokens=40, seed=7)
    b = backend.generate(prompts, n=3, temperature=1.0, max_tokens=40, seed=7)
    c = backend.generate(prompts, n=3, temperature=1.0, max_tokens=40, seed=8)
    assert [len(x) for x in a] == [3, 3]
    texts = lambda res: [[c.text for c in x] for x in res]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    n_prompt = len(backend.tokenizer(solve_prompt, add_special_tokens=False)["input_ids"])
    for comp in a[0]:
        assert comp.n_prompt_tokens == n_prompt
        assert 0 < comp.n_completion_tokens <= 40
        assert comp.finish_reason in ("stop", "length")


def test_max_tokens_limits_output(backend, synth_prompt):
    [[comp]] = backend.generate([synth_prompt], temperature=0, max_tokens=5)
    assert comp.finish_reason == "length"
    assert comp.n_completion_tokens == 5
    assert len(backend.tokenizer(comp.text, add_special_tokens=False)["input_ids"]) <= 6


def test_greedy_batched_equals_one_at_a_time(backend, solve_prompt, synth_prompt):
    # Left padding must not change what the model sees.
    prompts = [
        solve_prompt,
        synth_prompt,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ]
    batched = backend.generate(prompts, temperature=0, max_tokens=30)
    single = [backend.generate([p], temperature=0, max_tokens=30)[0] for p in prompts]
    assert [x[0].text for x in batched] == [x[0].text for x in single]


def test_stop_strings_cut_output_and_are_dropped(backend, synth_prompt):
    [[full]] = backend.generate([synth_prompt], temperature=0, max_tokens=60)
    assert len(full.text) > 20
    stop = full.text[10:14]
    [[cut]] = backend.generate([synth_prompt], temperature=0, max_tokens=60, stop=[stop, "@@@"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.n_completion_tokens < full.n_completion_tokens


def test_empty_completion_is_flagged(backend, synth_prompt):
    [[full]] = backend.generate([synth_prompt], temperature=0, max_tokens=10)
    [[empty]] = backend.generate([synth_prompt], temperature=0, max_tokens=10, stop=[full.text[:3]])
    assert empty.text == ""
    assert empty.error == "empty_completion"
    assert not empty.ok


def test_context_overflow_is_per_item(backend, solve_prompt):
    long_prompt = "word " * (MAX_LEN + 50)
    out = backend.generate(
        [solve_prompt, long_prompt, solve_prompt], n=2, temperature=0, max_tokens=8
    )
    assert [len(x) for x in out] == [2, 2, 2]
    assert all(c.ok for c in out[0] + out[2])
    assert [c.error for c in out[1]] == ["context_overflow", "context_overflow"]
    assert out[1][0].finish_reason == "error"
    scores = backend.score([solve_prompt, long_prompt], [" 7", " 7"])
    assert scores[0].ok and scores[1].error == "context_overflow"


def test_the_trained_tiny_model_speaks_the_formats(backend, synth_prompt, solve_prompt):
    """The tiny model is what the pipeline tests run on: its outputs must mostly parse."""
    synth = backend.generate(
        [synth_prompt], n=8, temperature=0.8, max_tokens=160, stop=list(P.SYNTHESIS.stop), seed=1
    )[0]
    ok = 0
    for c in synth:
        try:
            P.parse_synthesis(c.text, truncated=c.truncated)
            ok += 1
        except P.ParseError:
            pass
    assert ok >= 5, [c.text for c in synth]
    answers = []
    for c in backend.generate([solve_prompt], n=8, temperature=1.0, max_tokens=60, seed=2)[0]:
        answer = extract_answer(c.text)
        if answer is not None:
            answers.append(answer)
    assert len(answers) >= 5
    integers = [a for a in answers if a.lstrip("-").isdigit()]
    assert len(integers) >= 4 and len(set(integers)) >= 2  # small integers, not all the same


def test_transformers_backend_batches_within_one_call(backend):
    # The runtime sends it whole micro-batches of up to max_batch_size, one at a time.
    assert backend.max_in_flight == backend.settings.max_batch_size
    assert not backend.continuous_batching


# -- transformers: scoring ---------------------------------------------------------------------


def manual_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    """Independent reference: requires a clean token boundary, then sums log-softmax at the
    continuation positions of one unpadded forward pass."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    assert full == p_ids + c_ids, "test pair must have a clean boundary"
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[pos - 1, full[pos]].item() for pos in range(len(p_ids), len(full)))


def test_score_matches_a_manual_forward_pass(backend, synth_prompt, solve_prompt):
    z, x = P.synthesis_parts("Combine addition with counting.", "Ana has 3 apples. How many?")
    pairs = [
        (synth_prompt, z + x),  # long continuation
        (solve_prompt, "We work.\nThe answer is \\boxed{7}."),
        (solve_prompt + "We work.\n", "The answer"),  # short, different length: padding
    ]
    scores = backend.score([p for p, _ in pairs], [c for _, c in pairs])
    for (prompt, cont), s in zip(pairs, scores):
        assert s.ok
        assert math.isclose(s.total_logprob, sum(s.token_logprobs), abs_tol=1e-6)
        ref = manual_logprob(backend.model, backend.tokenizer, prompt, cont)
        assert math.isclose(s.total_logprob, ref, rel_tol=1e-4, abs_tol=1e-3), (s, ref)
        assert "".join(s.tokens) == cont
        assert all(v <= 0 for v in s.token_logprobs)
    # A format-following continuation is likelier under the trained model than junk.
    junk = backend.score([synth_prompt], ["zq xv kk pp"])[0]
    assert scores[0].mean_logprob > junk.mean_logprob


def test_score_handles_a_merged_token_boundary(backend):
    prompt, cont = "The answer is 4", "2 apples"
    tok = backend.tokenizer
    full = tok(prompt + cont, add_special_tokens=False)["input_ids"]
    [s] = backend.score([prompt], [cont])
    # Every continuation character is covered exactly once, even if BPE merged across the cut.
    covered = "".join(s.tokens)
    assert covered.endswith(cont) and len(covered) - len(cont) < 4
    assert s.n_tokens <= len(full) - 1
    assert math.isfinite(s.total_logprob)


# -- versions, reload, factory -----------------------------------------------------------------


def test_model_version_reload_and_factory(tiny_model_dir, tmp_path, backend):
    name, digest = backend.model_version.split("@")
    assert name == tiny_model_dir.name and len(digest) == 12
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    other = TransformersBackend(BackendSettings(model=str(tiny_model_dir)))
    other.reload(str(copy))
    assert other.model_version == f"copy@{digest}"  # same weights, same hash

    clear_cache()
    settings = BackendSettings(model=str(tiny_model_dir))
    assert make_backend(settings) is make_backend(settings.model_copy())
    pool = BackendPool(
        {
            "prompt_model": settings,
            "solver": settings,
            "rationale_model": settings.model_copy(update={"max_batch_size": 4}),
        }
    )
    assert pool.get("prompt_model") is pool.get("solver")
    assert pool.get("rationale_model") is not pool.get("solver")
    moved = pool.reload("prompt_model", str(copy))  # shared -> copy on write
    assert moved is not pool.get("solver")
    assert pool.versions()["prompt_model"].startswith("copy@")
    assert pool.versions()["solver"].startswith(tiny_model_dir.name)
    with pytest.raises(KeyError):
        ModelRoles().role("nobody")
    clear_cache()


def test_a_process_serving_one_role_never_prepares_the_embedded_model_for_another(
    tiny_model_dir, monkeypatch
):
    """Roles with no model named run the embedded SmolLM2, prepared when such a role is
    served: not for every role as soon as any one is."""
    from llm import smollm2
    from llm.roles import RoleBackends, backend_for

    prepared = []
    monkeypatch.setattr(smollm2, "prepare_smollm2", lambda *a, **k: prepared.append(a) or "x")
    models = ModelRoles(prompt_model={"model": str(tiny_model_dir), "max_batch_size": 3})
    backend = backend_for(models, "prompt_model")
    assert backend.settings.model == str(tiny_model_dir) and prepared == []
    assert RoleBackends.pool(models).settings("judge").model == "x" and len(prepared) == 1


# -- OpenAI-compatible HTTP --------------------------------------------------------------------


class CompletionsServer:
    """A real HTTP server on loopback speaking /v1/completions (the subset vLLM serves), backed
    by the transformers backend. Model "slow" sleeps; "flaky" fails with 503 twice first."""

    def __init__(self, backend: TransformersBackend):
        self.backend = backend
        self.requests = 0
        self.flaky_failures = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                if body["model"] == "slow":
                    time.sleep(1.5)  # past the client's timeout; then answer without the model
                    return self._reply(200, {"choices": [], "usage": {}})
                if body["model"] == "surrogate":  # a lone surrogate, as JSON sends it
                    text = "half a character: \ud800, then more"
                    choice = {"index": 0, "text": text, "finish_reason": "stop"}
                    return self._reply(200, {"choices": [choice], "usage": {}})
                if body["model"] == "flaky" and server.flaky_failures < 2:
                    server.flaky_failures += 1
                    return self._reply(503, {"error": "warming up"})
                status, reply = server.complete(body)
                self._reply(status, reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Join handler threads on close: a handler still running torch while the interpreter
        # exits aborts the process.
        self.httpd.daemon_threads = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def complete(self, body: dict) -> tuple[int, dict]:
        b = self.backend
        prompt = body["prompt"]
        overflow = (
            400,
            {
                "error": {
                    "message": f"This model's maximum context length is "
                    f"{b.settings.max_model_len} tokens."
                }
            },
        )
        if body.get("echo") and body.get("logprobs") is not None:
            [(ids, offsets, values)] = b.prompt_logprobs([prompt])
            if len(ids) + 1 > b.settings.max_model_len:
                return overflow
            [[gen]] = b.generate([prompt], temperature=0, max_tokens=1)
            tokens = [b.tokenizer.decode([t]) for t in ids] + [gen.text]
            return 200, {
                "choices": [
                    {
                        "index": 0,
                        "text": prompt + gen.text,
                        "finish_reason": "length",
                        "logprobs": {
                            "tokens": tokens,
                            "token_logprobs": values + [-0.5],
                            "text_offset": [s for s, _ in offsets] + [len(prompt)],
                        },
                    }
                ],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1},
            }
        [items] = [
            b.generate(
                [prompt],
                n=body.get("n", 1),
                temperature=body["temperature"],
                top_p=body.get("top_p", 1.0),
                max_tokens=body["max_tokens"],
                stop=body.get("stop"),
                seed=body.get("seed"),
            )
        ]
        completions = items[0]
        if completions and completions[0].error == "context_overflow":
            return overflow
        return 200, {
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason}
                for i, c in enumerate(completions)
            ],
            "usage": {
                "prompt_tokens": completions[0].n_prompt_tokens,
                "completion_tokens": sum(c.n_completion_tokens for c in completions),
            },
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(backend):
    s = CompletionsServer(backend)
    yield s
    s.close()


def http_backend(url: str, model: str = "tiny", **kw) -> OpenAIBackend:
    settings = {
        "kind": "openai",
        "model": model,
        "base_url": url,
        "timeout_s": 10,
        "max_retries": 2,
        "backoff_s": 0.05,
        "concurrency": 4,
    }
    settings.update(kw)
    return OpenAIBackend(BackendSettings(**settings))


def test_openai_generate_matches_in_process(server, backend, solve_prompt, synth_prompt):
    remote = http_backend(server.url)
    prompts = [solve_prompt, synth_prompt]
    local = backend.generate(prompts, temperature=0, max_tokens=24, stop=["</rationale>"])
    got = remote.generate(prompts, temperature=0, max_tokens=24, stop=["</rationale>"])
    assert [x[0].text for x in got] == [x[0].text for x in local]
    assert [x[0].finish_reason for x in got] == [x[0].finish_reason for x in local]
    assert got[0][0].n_prompt_tokens == local[0][0].n_prompt_tokens
    sampled = remote.generate([solve_prompt], n=3, temperature=1.0, max_tokens=12, seed=5)
    assert len(sampled[0]) == 3
    assert remote.model_version == f"openai:tiny@{server.url}"
    remote.close()


def test_openai_score_matches_in_process(server, backend, solve_prompt):
    remote = http_backend(server.url)
    prompts = [solve_prompt, "The answer is 4"]
    conts = ["We work.\nThe answer is \\boxed{7}.", "2 apples"]
    local = backend.score(prompts, conts)
    got = remote.score(prompts, conts)
    for a, b in zip(got, local):
        assert a.tokens == b.tokens
        assert math.isclose(a.total_logprob, b.total_logprob, abs_tol=1e-4)  # JSON float trip
    remote.close()


def test_openai_context_overflow_is_per_item(server, solve_prompt):
    remote = http_backend(server.url)
    out = remote.generate([solve_prompt, "word " * (MAX_LEN + 50)], temperature=0, max_tokens=4)
    assert out[0][0].ok and out[1][0].error == "context_overflow"
    scores = remote.score(["word " * (MAX_LEN + 50)], ["x"])
    assert scores[0].error == "context_overflow"
    remote.close()


def test_openai_retries_then_succeeds(server, solve_prompt):
    server.flaky_failures = 0
    before = server.requests
    remote = http_backend(server.url, model="flaky", max_retries=3)
    [[c]] = remote.generate([solve_prompt], temperature=0, max_tokens=4)
    assert c.ok
    assert server.requests - before == 3  # 503, 503, 200
    remote.close()


def test_model_text_is_valid_utf8_whatever_the_backend_and_the_repair_is_counted(server):
    """A server may send a lone surrogate (a JSON "\\ud800": byte-level decoding cut inside a
    character); no record could carry it. The backend boundary replaces it with U+FFFD."""
    from llm.backends.base import Completion
    from streams import metrics

    before = metrics.counter_value(metrics.MODEL_TEXT_REPLACED)
    remote = http_backend(server.url, model="surrogate")
    [[c]] = remote.generate(["hi"], max_tokens=8)
    remote.close()
    assert c.text == "half a character: \ufffd, then more" and c.ok
    c.text.encode("utf-8")  # encodes
    assert metrics.counter_value(metrics.MODEL_TEXT_REPLACED) == before + 1
    # Every backend builds Completion: the repair is there, once.
    assert Completion("\udcff\udcfe", 1, 2, "stop").text == "\ufffd\ufffd"
    assert metrics.counter_value(metrics.MODEL_TEXT_REPLACED) == before + 3


def test_openai_unreachable_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = http_backend(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.05)
    started = time.perf_counter()
    with pytest.raises(UnreachableError) as info:
        remote.generate(["hi"], max_tokens=2)
    assert info.value.reason == "unreachable"
    assert time.perf_counter() - started >= 0.05 + 0.1  # two backoffs happened
    remote.close()


def test_openai_slow_endpoint_times_out(server):
    remote = http_backend(server.url, model="slow", timeout_s=0.3, max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendTimeoutError) as info:
        remote.generate(["hi"], max_tokens=2)
    assert info.value.reason == "timeout"
    remote.close()


def test_stopping_the_loop_thread_fails_a_call_in_flight_instead_of_hanging_it():
    import asyncio

    from llm.backends.base import BackendError
    from llm.backends.event_loop import LoopThread

    loop = LoopThread("test-loop", "the test backend")
    started = threading.Event()
    outcome: list[BaseException | None] = []

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    def call() -> None:
        try:
            loop.run(forever())
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects what the caller got
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert started.wait(timeout=30)
    loop.stop(timeout_s=30)
    caller.join(timeout=30)
    assert not caller.is_alive(), "the caller still waits on a loop that stopped"
    [error] = outcome
    assert isinstance(error, BackendError) and "closed during the call" in str(error)
    assert loop.loop.is_closed()
