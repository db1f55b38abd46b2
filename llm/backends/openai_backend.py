"""OpenAI-compatible HTTP backend (``vllm serve``, SGLang, ...) over /v1/completions.

One request per prompt, sent from one asyncio loop per backend (a background thread): every
``generate``/``score`` call from any thread adds its requests to that loop, and at most
``concurrency`` requests are in flight per backend across all callers. So many threads calling
at once keep a continuously batching server full, and one slow completion holds up only its
own caller.

Retries are tenacity's (exponential backoff from ``backoff_s`` with jitter, so hundreds of
requests that failed together do not retry together) on connect errors, timeouts, 429 and 5xx;
after the last try the whole call raises ``UnreachableError`` or ``BackendTimeoutError``. A
prompt the server rejects for its length becomes a per-item ``context_overflow``.

Scoring sends prompt+continuation with ``echo`` and ``logprobs`` and ``max_tokens=1``, and keeps
the echoed prompt tokens whose text lies in the continuation (``text_offset``).

The client is aiohttp, for its CPU per request (docs/models.md, "Keeping engines saturated"):
at a server's throughput, the stage's own CPU is what competes with the server for the cores.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from llm.backends.base import (
    Backend,
    BackendSettings,
    BackendTimeoutError,
    BadRequestError,
    Completion,
    ContextOverflowError,
    Score,
    UnreachableError,
    continuation_span,
    failed_completions,
    failed_score,
    mark_empty,
)
from llm.backends.event_loop import LoopThread, gather_or_cancel

_RETRY_STATUS = {429, 500, 502, 503, 504}
_OVERFLOW_HINTS = (
    "context length",
    "maximum context",
    "max_model_len",
    "too long",
    "context_length",
    "longer than",
)


class _ItemOverflow(Exception):
    """The server refused this one prompt for its length."""


class OpenAIBackend(Backend):
    continuous_batching = True

    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._served_model = settings.model
        self.model_version = f"openai:{settings.model}@{settings.base_url}"
        self._tokenizer = None
        if settings.tokenizer:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                settings.tokenizer, local_files_only=True
            )
        self._loop = LoopThread("openai-backend", "the OpenAI backend")
        self._closed = False
        self._client, self._slots = self._loop.run(self._open())

    async def _open(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        s = self.settings
        session = aiohttp.ClientSession(
            base_url=s.base_url.rstrip("/") + "/",
            # The semaphore below admits only as many requests as connections, so no request
            # waits for a pooled connection: the connect bound is the socket's alone.
            timeout=aiohttp.ClientTimeout(total=s.timeout_s, sock_connect=min(s.timeout_s, 10.0)),
            headers={"Authorization": f"Bearer {s.api_key}"},
            connector=aiohttp.TCPConnector(limit=s.concurrency),
        )
        return session, asyncio.Semaphore(s.concurrency)

    @property
    def max_in_flight(self) -> int:
        return self.settings.concurrency

    # -- plumbing -----------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries. Raises a BackendError for whole-call failures and _ItemOverflow
        for a prompt that is too long."""
        s = self.settings
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.max_retries + 1),
            wait=wait_exponential_jitter(multiplier=s.backoff_s, jitter=s.backoff_s),
            retry=retry_if_exception_type((UnreachableError, BackendTimeoutError)),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._post_once(path, body)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _post_once(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        async with self._slots:  # held for the request only, not across backoff sleeps
            try:
                async with self._client.post(path.lstrip("/"), json=body) as resp:
                    # JSON is UTF-8 (RFC 8259); bytes that are not become U+FFFD, not an error.
                    status, text = resp.status, (await resp.read()).decode(errors="replace")
            except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one
                raise UnreachableError(f"{s.base_url}{path}: {exc!r}") from exc
            except TimeoutError as exc:  # past timeout_s, the whole request's bound
                raise BackendTimeoutError(f"{path}: {exc!r}") from exc
            except aiohttp.ClientError as exc:  # refused, reset, DNS, a cut-off body
                raise UnreachableError(f"{s.base_url}{path}: {exc!r}") from exc
        if status in _RETRY_STATUS:
            raise UnreachableError(f"{path}: HTTP {status} {text[:200]}")
        if status >= 400:
            text = text[:500]
            if status in (400, 413, 422) and any(h in text.lower() for h in _OVERFLOW_HINTS):
                raise _ItemOverflow(text)
            raise BadRequestError(f"{path}: HTTP {status} {text}")
        return json.loads(text)

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        sampling: dict[str, Any] = {
            "n": n,
            "temperature": temperature,
            "top_p": top_p if temperature > 0 else 1.0,
            "max_tokens": max_tokens,
        }
        if stop:
            sampling["stop"] = list(stop)
        if seed is not None:
            sampling["seed"] = seed
        if not prompts:
            return []
        return self._loop.run(gather_or_cancel([self._complete(p, n, sampling) for p in prompts]))

    async def _complete(self, prompt: str, n: int, sampling: dict[str, Any]) -> list[Completion]:
        body = {"model": self._served_model, "prompt": prompt, **sampling}
        try:
            data = await self._post("/completions", body)
        except _ItemOverflow:
            return failed_completions(n, ContextOverflowError.reason)
        usage = data.get("usage") or {}
        n_prompt = int(usage.get("prompt_tokens", 0))
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        total_completion = int(usage.get("completion_tokens", 0))
        out = []
        for choice in choices:
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            # Servers report tokens for the whole response; spread them when n > 1.
            n_tokens = total_completion // max(1, len(choices))
            out.append(mark_empty(Completion(choice.get("text", ""), n_prompt, n_tokens, finish)))
        return out

    # -- scoring ------------------------------------------------------------------------------

    def score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")
        if not prompts:
            return []
        return self._loop.run(
            gather_or_cancel([self._score(p, c) for p, c in zip(prompts, continuations)])
        )

    async def _score(self, prompt: str, continuation: str) -> Score:
        body = {
            "model": self._served_model,
            "prompt": prompt + continuation,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 0,
        }
        try:
            data = await self._post("/completions", body)
        except _ItemOverflow:
            return failed_score(ContextOverflowError.reason)
        logprobs = data["choices"][0]["logprobs"]
        n_prompt = int((data.get("usage") or {}).get("prompt_tokens", len(logprobs["tokens"]) - 1))
        tokens = logprobs["tokens"][:n_prompt]  # drop the one generated token
        values = logprobs["token_logprobs"][:n_prompt]
        starts = logprobs["text_offset"][:n_prompt]
        ends = starts[1:] + [len(prompt) + len(continuation)]
        first = max(1, continuation_span(list(zip(starts, ends)), len(prompt)))
        lps = [float(v) for v in values[first:] if v is not None]
        return Score(sum(lps), lps, list(tokens[first:]))

    # -- the rest -----------------------------------------------------------------------------

    def reload(self, model_path: str) -> None:
        """New weights live on the server: address them by their served name (a LoRA adapter
        loaded with ``--lora-modules`` or /v1/load_lora_adapter, or a restarted server)."""
        with self._lock:
            self._served_model = model_path
            self.model_version = f"openai:{model_path}@{self.settings.base_url}"

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        if self._tokenizer is not None and getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return super().render_messages(messages)

    async def _shutdown(self) -> None:
        """Cancel calls still running (their callers get a BackendError), close connections."""
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._client.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._loop.run(self._shutdown())
        finally:
            self._loop.stop(timeout_s=10)
