"""A loopback OpenAI-compatible model server for benchmarks and tests: no model, set latency.

It stands in for a GPU inference server where the thing measured is the pipeline around it, not
the model. It serves /v1/completions (``n``, ``max_tokens``, ``stop``, ``seed``, ``echo`` with
``logprobs`` for scoring) and /v1/models like ``vllm serve``; each request takes
``latency_s + per_token_s * tokens`` (the longest of its ``n`` choices), during which it holds
one of ``capacity`` slots (an engine's max concurrent sequences; further requests wait). Text is
words from a generator seeded by (server seed, request seed, prompt, choice), or the prompt
echoed back. A token is a word with its leading white space.

GET /stats reports, since start, counters a benchmark diffs between two reads: requests,
seconds with at least one request running (``busy_s``), slot-seconds in use (``slot_s``: divide
by capacity x elapsed for the share of the engine kept busy), seconds at full capacity and
seconds spent at each number of running requests.

In process: ``with LoopbackServer(LoopbackSettings(latency_s=0.5)) as server: server.url``.
As a process: ``python -m promptcot loopback-server --latency-s 0.5``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

from aiohttp import web
from pydantic import Field

from streams.settings import Section

_TOKEN = re.compile(r"\s*\S+|\s+")
_TEXT = (
    "the sum of two numbers is equal to a product of three primes so each term in the sequence "
    "has a remainder when divided by seven and every triangle with integer sides keeps its area "
    "positive while the circle through four points meets a line at most twice"
)
WORDS = tuple(_TEXT.split())


class LoopbackSettings(Section):
    """How the loopback server answers."""

    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, description="0: a free port")
    model: str = Field("loopback", description="the served model name")
    latency_s: float = Field(0.0, ge=0, description="per request, before any token")
    per_token_s: float = Field(0.0, ge=0, description="per generated token")
    capacity: int = Field(256, ge=1, description="requests served at once; more wait")
    text: Literal["seeded", "echo"] = Field("seeded", description="seeded words or the prompt")
    seed: int = 0
    max_model_len: int = Field(4096, ge=1, description="prompt + max_tokens, in tokens")


def tokenize(text: str) -> list[tuple[int, str]]:
    """(character offset, token) of each token; the tokens concatenate to ``text``."""
    return [(m.start(), m.group()) for m in _TOKEN.finditer(text)]


def token_logprob(previous: str, token: str) -> float:
    """A fixed, made-up log-probability in [-5.1, -0.1] for ``token`` after ``previous``."""
    return -(0.1 + zlib.crc32(f"{previous}\x00{token}".encode()) % 1000 / 200)


class InFlight:
    """Requests running and waiting, and time integrals of them (see the module docstring)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots = asyncio.Semaphore(capacity)
        self.running = self.waiting = self.requests = self.completed = self.peak = 0
        self.started = self._last = time.monotonic()
        self.busy_s = self.slot_s = self.full_s = 0.0
        self.level_s: dict[int, float] = defaultdict(float)

    def _advance(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        self.level_s[self.running] += dt
        if self.running:
            self.busy_s += dt
            self.slot_s += self.running * dt
        if self.running >= self.capacity:
            self.full_s += dt

    async def hold(self, seconds: float) -> None:
        """Wait for a slot, then hold it for ``seconds``."""
        self.requests += 1
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self._advance()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._advance()
            self.running -= 1
            self.completed += 1
            self.slots.release()

    def snapshot(self) -> dict[str, Any]:
        self._advance()
        return {
            "uptime_s": time.monotonic() - self.started,
            "capacity": self.capacity,
            "requests": self.requests,
            "completed": self.completed,
            "running": self.running,
            "waiting": self.waiting,
            "peak_running": self.peak,
            "busy_s": self.busy_s,
            "slot_s": self.slot_s,
            "full_s": self.full_s,
            "running_level_s": {str(k): v for k, v in sorted(self.level_s.items())},
        }


def _error(status: int, message: str) -> web.Response:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "Error")
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": status}}, status=status
    )


class _Completions:
    def __init__(self, settings: LoopbackSettings):
        self.settings = settings
        self.inflight = InFlight(settings.capacity)
        self._ids = 0

    def _choice_tokens(
        self, prompt_tokens: list[str], prompt: str, body: dict[str, Any], index: int
    ) -> tuple[list[str], str]:
        """Generated tokens and finish reason of one choice."""
        s = self.settings
        greedy = float(body.get("temperature", 1.0)) == 0
        request_seed = body.get("seed")
        if request_seed is None and not greedy:
            request_seed = f"unseeded-{self._ids}"
        key = f"{s.seed}|{'greedy' if greedy else request_seed}|{0 if greedy else index}|{prompt}"
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        stops = [x for x in (body.get("stop") or []) if x]
        if isinstance(body.get("stop"), str):
            stops = [body["stop"]]
        text, out = "", []
        for i in range(int(body.get("max_tokens", 16))):
            if s.text == "echo":
                token = prompt_tokens[i % len(prompt_tokens)] if prompt_tokens else " "
                token = token if token[:1].isspace() else " " + token
            else:
                token = " " + WORDS[rng.randrange(len(WORDS))]
            out.append(token)
            text += token
            for stop in stops:
                cut = text.find(stop, max(0, len(text) - len(token) - len(stop)))
                if cut >= 0:
                    return _cut(out, cut), "stop"
        return out, "length"

    async def complete(self, request: web.Request) -> web.Response:
        s = self.settings
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the body is not a JSON object")
        if body.get("model") != s.model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            return _error(400, "prompt must be a string or a list of strings")
        try:
            n, max_tokens = int(body.get("n", 1)), int(body.get("max_tokens", 16))
            float(body.get("temperature", 1.0))
        except (TypeError, ValueError):
            return _error(400, "n, max_tokens and temperature must be numbers")
        if n < 1 or max_tokens < 0:
            return _error(400, "n must be >= 1 and max_tokens >= 0")
        self._ids += 1
        choices, n_prompt, n_completion, longest = [], 0, 0, 0
        for p_index, prompt in enumerate(prompts):
            tokens = [t for _, t in tokenize(prompt)]
            if len(tokens) + max_tokens > s.max_model_len:
                return _error(
                    400,
                    f"This model's maximum context length is {s.max_model_len} tokens. However, "
                    f"you requested {len(tokens) + max_tokens} tokens ({len(tokens)} in the "
                    f"messages, {max_tokens} in the completion).",
                )
            n_prompt += len(tokens)
            for j in range(n):
                generated, finish = self._choice_tokens(tokens, prompt, body, j)
                n_completion += len(generated)
                longest = max(longest, len(generated))
                choices.append(self._choice(p_index * n + j, prompt, generated, finish, body))
        await self.inflight.hold(s.latency_s + s.per_token_s * longest)
        return web.json_response(
            {
                "id": f"cmpl-{self._ids}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": s.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_completion,
                    "total_tokens": n_prompt + n_completion,
                },
            }
        )

    @staticmethod
    def _choice(
        index: int, prompt: str, generated: list[str], finish: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        echo = bool(body.get("echo"))
        text = "".join(generated)
        choice: dict[str, Any] = {
            "index": index,
            "text": prompt + text if echo else text,
            "finish_reason": finish,
            "logprobs": None,
        }
        if body.get("logprobs") is not None:
            tokens = [t for _, t in tokenize(prompt)] if echo else []
            offsets = [o for o, _ in tokenize(prompt)] if echo else []
            base = len(prompt) if echo else 0
            for t in generated:
                offsets.append(base)
                tokens.append(t)
                base += len(t)
            values: list[float | None] = [
                None if i == 0 and echo else token_logprob(tokens[i - 1] if i else "", t)
                for i, t in enumerate(tokens)
            ]
            top = [None if v is None else {t: v} for t, v in zip(tokens, values)]
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": values,
                "text_offset": offsets,
                "top_logprobs": top if int(body["logprobs"]) > 0 else None,
            }
        return choice

    async def models(self, _: web.Request) -> web.Response:
        s = self.settings
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": s.model,
                        "object": "model",
                        "owned_by": "loopback",
                        "max_model_len": s.max_model_len,
                    }
                ],
            }
        )

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.inflight.snapshot())

    async def health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")


def _cut(tokens: list[str], chars: int) -> list[str]:
    """The tokens before character ``chars`` (a stop string and what follows are dropped; the
    token the stop string starts in is kept up to it)."""
    out, used = [], 0
    for t in tokens:
        if used + len(t) > chars:
            if chars > used:
                out.append(t[: chars - used])
            break
        out.append(t)
        used += len(t)
    return out


def build_app(settings: LoopbackSettings) -> tuple[web.Application, _Completions]:
    handler = _Completions(settings)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(
        [
            web.post("/v1/completions", handler.complete),
            web.get("/v1/models", handler.models),
            web.get("/stats", handler.stats),
            web.get("/health", handler.health),
        ]
    )
    return app, handler


async def serve(
    settings: LoopbackSettings, on_ready: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Serve until ``stop`` is set; ``on_ready(url)`` once the port listens."""
    app, _ = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1]
    on_ready(f"http://{settings.host}:{port}/v1")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class LoopbackServer:
    """The server on a background thread of this process (tests; benchmarks run it as its own
    process so it does not share the interpreter with what it measures)."""

    def __init__(self, settings: LoopbackSettings | None = None):
        self.settings = settings or LoopbackSettings()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._handler: _Completions | None = None

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _start(self) -> None:
        app, self._handler = build_app(self.settings)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.host, self.settings.port).start()
        self.url = f"http://{self.settings.host}:{self._runner.addresses[0][1]}/v1"

    def stats(self) -> dict[str, Any]:
        assert self._handler is not None, "the server is not started"

        async def read() -> dict[str, Any]:
            assert self._handler is not None
            return self._handler.inflight.snapshot()

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result()

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
