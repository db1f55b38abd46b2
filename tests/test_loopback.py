"""The loopback model server (llm/backends/loopback.py) and the asynchronous OpenAI-compatible
backend driving it: concurrent requests are served concurrently (read from the server's own
in-flight report, not from wall time), the backend keeps up to ``concurrency`` requests in
flight across calls from many threads, and the completions protocol (n, stop, seed, echo +
logprobs, context overflow) holds end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from llm.backends import BackendSettings, BadRequestError
from llm.backends.loopback import LoopbackServer, LoopbackSettings, token_logprob, tokenize
from llm.backends.openai_backend import OpenAIBackend

ROOT = Path(__file__).resolve().parents[1]


def backend_for(server: LoopbackServer, **kw) -> OpenAIBackend:
    settings = {
        "kind": "openai",
        "model": "loopback",
        "base_url": server.url,
        "timeout_s": 30,
        "max_retries": 1,
        "backoff_s": 0.05,
        "concurrency": 16,
    }
    settings.update(kw)
    return OpenAIBackend(BackendSettings(**settings))


@pytest.fixture
def slow_server():
    with LoopbackServer(LoopbackSettings(latency_s=0.5)) as server:
        yield server


def test_sixteen_requests_are_served_at_once(slow_server):
    backend = backend_for(slow_server)
    out = backend.generate([f"prompt {i}" for i in range(16)], max_tokens=4)
    backend.close()
    assert [len(x) for x in out] == [1] * 16
    stats = slow_server.stats()
    assert stats["completed"] == 16 and stats["peak_running"] == 16
    # 16 requests of 0.5 s each: 8 slot-seconds of work; served one by one the server would be
    # busy for 8 s, served together for about 0.5 s.
    assert stats["slot_s"] == pytest.approx(8.0, rel=0.05)
    assert stats["busy_s"] < 4.0


def test_calls_from_many_threads_share_the_in_flight_limit(slow_server):
    backend = backend_for(slow_server, concurrency=6)
    assert backend.max_in_flight == 6 and OpenAIBackend.continuous_batching
    results: dict[int, list] = {}

    def one(i: int) -> None:  # what the runtime does: one record per call, many threads
        results[i] = backend.generate([f"record {i}"], max_tokens=2)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    backend.close()
    assert sorted(results) == list(range(12)) and all(r[0][0].ok for r in results.values())
    stats = slow_server.stats()
    assert stats["peak_running"] == 6  # calls did not serialize, and never exceeded the limit
    assert stats["running_level_s"]["6"] > stats["busy_s"] / 2


def test_a_full_server_queues_what_is_over_its_capacity():
    with LoopbackServer(LoopbackSettings(latency_s=0.3, capacity=2)) as server:
        backend = backend_for(server, concurrency=6)
        backend.generate([f"p{i}" for i in range(6)], max_tokens=1)
        backend.close()
        stats = server.stats()
    assert stats["peak_running"] == 2 and stats["completed"] == 6
    assert stats["full_s"] >= stats["busy_s"] / 2  # slots stayed full while requests waited


def test_completions_protocol_through_the_backend():
    with LoopbackServer(LoopbackSettings(max_model_len=64)) as server:
        backend = backend_for(server)
        prompt = "Ana has three apples and"
        a = backend.generate([prompt], n=3, temperature=1.0, max_tokens=8, seed=5)
        b = backend.generate([prompt], n=3, temperature=1.0, max_tokens=8, seed=5)
        c = backend.generate([prompt], n=3, temperature=1.0, max_tokens=8, seed=6)
        texts = lambda res: [x.text for x in res[0]]
        assert texts(a) == texts(b) != texts(c)
        assert len(set(texts(a))) > 1  # choices differ from each other
        first = a[0][0]
        assert first.n_prompt_tokens == 5 and first.n_completion_tokens == 8
        assert first.finish_reason == "length"
        # A stop string cuts the text before it, and the reason is "stop".
        stop = first.text.split()[2]
        [[cut]] = backend.generate(
            [prompt], n=1, temperature=1.0, max_tokens=8, seed=5, stop=[f" {stop}"]
        )
        assert cut.finish_reason == "stop" and cut.text == first.text[: first.text.find(f" {stop}")]
        # Greedy ignores the seed.
        g1 = backend.generate([prompt], temperature=0, max_tokens=6, seed=1)
        g2 = backend.generate([prompt], temperature=0, max_tokens=6, seed=2)
        assert g1[0][0].text == g2[0][0].text
        # Too long for the context: per item; the other prompt still runs.
        out = backend.generate(["word " * 70, prompt], max_tokens=4)
        assert out[0][0].error == "context_overflow" and out[1][0].ok
        backend.close()


def test_scoring_by_echo_and_logprobs():
    with LoopbackServer(LoopbackSettings()) as server:
        backend = backend_for(server)
        prompt, continuation = "The answer is", " 42 apples."
        [s] = backend.score([prompt], [continuation])
        backend.close()
    tokens = [t for _, t in tokenize(prompt + continuation)]
    assert s.tokens == [" 42", " apples."] == tokens[3:]
    assert s.token_logprobs == [token_logprob(tokens[2], tokens[3]), token_logprob(*tokens[3:5])]
    assert s.total_logprob == pytest.approx(sum(s.token_logprobs))


def test_echo_mode_answers_with_the_prompt():
    with LoopbackServer(LoopbackSettings(text="echo")) as server:
        backend = backend_for(server)
        [[c]] = backend.generate(["one two three"], max_tokens=4)
        backend.close()
    assert c.text == " one two three one"


def test_unknown_model_is_a_bad_request_not_a_retry():
    with LoopbackServer(LoopbackSettings()) as server:
        backend = backend_for(server, model="nobody", max_retries=3)
        with pytest.raises(BadRequestError, match="404"):
            backend.generate(["hi"], max_tokens=1)
        backend.close()
        assert server.stats()["requests"] == 0  # refused before it took a slot, never retried


def test_a_typo_in_the_settings_is_an_error():
    with pytest.raises(ValidationError, match="latency\n  Extra inputs are not permitted"):
        LoopbackSettings(latency=0.5)


def test_the_cli_serves_until_sigterm(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptcot", "loopback-server", "--port", "0", "--model", "m"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("loopback server ready: http://127.0.0.1:"), line
        url = line.split()[-1]
        assert httpx.get(f"{url}/models", timeout=10).json()["data"][0]["id"] == "m"
        reply = httpx.post(
            f"{url}/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=10
        ).json()
        assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_bad_requests_get_a_clear_400():
    with LoopbackServer(LoopbackSettings()) as server:
        post = lambda body: httpx.post(f"{server.url}/completions", json=body, timeout=10)
        for body, says in [
            ({"model": "loopback", "prompt": "x", "max_tokens": "many"}, "must be numbers"),
            ({"model": "loopback", "prompt": 3}, "prompt must be a string"),
            ({"model": "loopback", "prompt": "x", "n": 0}, "n must be >= 1"),
        ]:
            reply = post(body)
            assert reply.status_code == 400 and says in reply.json()["error"]["message"]
        assert server.stats()["requests"] == 0


@pytest.mark.slow
def test_the_generate_stage_keeps_the_server_at_its_backends_in_flight(tmp_path):
    """Runtime + OpenAI backend + loopback server through the real broker: the stage keeps as
    many requests in flight as the backend asks for (max_in_flight = concurrency), not one
    micro-batch of batch_size."""
    import asyncio
    import uuid

    from factory_harness import read_records, wait_until

    from promptcot.settings import Settings
    from streams.broker import EmbeddedBroker
    from streams.clients import publish
    from streams.cluster import kafka_python_config
    from streams.records import ConceptSet
    from streams.topics import CONCEPTS, ensure_topics
    from workers.runtime import run_stages
    from workers.stages.generate import GenerateStage

    concurrency, n_sets = 6, 24
    with (
        LoopbackServer(LoopbackSettings(latency_s=0.3, capacity=64)) as server,
        EmbeddedBroker() as broker,
    ):
        settings = Settings(
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "namespace": f"lb{uuid.uuid4().hex[:8]}",
                "partitions": 2,
            },
            models={
                "prompt_model": {
                    "kind": "openai",
                    "model": "loopback",
                    "base_url": server.url,
                    "concurrency": concurrency,
                }
            },
            stages={"generate": {"batch_size": 2, "batch_within_s": 0.2}},
            worker={"journal_dir": str(tmp_path / "journal")},
            metrics={"port": 0},
            generation={"max_rationale_tokens": 8, "max_problem_tokens": 8},
        )
        ns = settings.kafka.namespace
        ensure_topics(kafka_python_config(settings.kafka, broker.bootstrap_servers), ns, 2, 1)
        sets = [
            ConceptSet(domain="math", difficulty="AIME", draw=f"t:{i}", concepts=["counting"])
            for i in range(n_sets)
        ]
        publish(settings.kafka, broker.bootstrap_servers, CONCEPTS, sets)

        def settled() -> bool:
            done = {r.subject_id for r, _ in read_records(settings, "verdicts", 0.5) if r}
            done |= {r.concept_set_id for r, _ in read_records(settings, "candidates", 0.5) if r}
            return {cs.id for cs in sets} <= done

        async def until() -> None:
            await wait_until(settled, timeout_s=300, poll_s=1.0)

        stage = GenerateStage(settings)
        asyncio.run(run_stages(settings, [stage], broker.bootstrap_servers, until=until))
        stats = server.stats()
    assert stats["completed"] >= 2 * n_sets  # a rationale and a problem call per concept set
    assert stats["peak_running"] == concurrency  # not batch_size (2): records ran side by side
