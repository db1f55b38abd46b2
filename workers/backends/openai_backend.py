"""OpenAI-compatible HTTP backend (``vllm serve``, SGLang, ...) over /v1/completions.

One request per prompt (the server batches continuously), at most ``concurrency`` in flight per
backend. Connect errors, timeouts, 429 and 5xx are retried with exponential backoff; after the
last try the whole call raises ``UnreachableError`` or ``BackendTimeoutError``. A prompt the
server rejects for its length becomes a per-item ``context_overflow``.

Scoring sends prompt+continuation with ``echo`` and ``logprobs`` and ``max_tokens=1``, and keeps
the echoed prompt tokens whose text lies in the continuation (``text_offset``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from workers.backends.base import (
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
    def __init__(self, settings: BackendSettings):
        self.settings = settings
        self._client = httpx.Client(
            base_url=settings.base_url.rstrip("/"),
            timeout=httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0)),
            headers={"Authorization": f"Bearer {settings.api_key}"},
            limits=httpx.Limits(max_connections=settings.concurrency),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="openai-backend"
        )
        self._lock = threading.Lock()
        self._served_model = settings.model
        self.model_version = f"openai:{settings.model}@{settings.base_url}"
        self._tokenizer = None
        if settings.tokenizer:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                settings.tokenizer, local_files_only=True
            )

    # -- plumbing -----------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries. Raises a BackendError for whole-call failures and _ItemOverflow
        for a prompt that is too long."""
        s = self.settings
        last: Exception | None = None
        for attempt in range(s.max_retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._client.post(path, json=body)
            except httpx.TimeoutException as exc:  # connect or read
                last = BackendTimeoutError(f"{path}: {exc!r}")
                if isinstance(exc, httpx.ConnectTimeout):
                    last = UnreachableError(f"{path}: {exc!r}")
                continue
            except httpx.TransportError as exc:  # refused, reset, DNS
                last = UnreachableError(f"{s.base_url}{path}: {exc!r}")
                continue
            if resp.status_code in _RETRY_STATUS:
                last = UnreachableError(f"{path}: HTTP {resp.status_code} {resp.text[:200]}")
                continue
            if resp.status_code >= 400:
                text = resp.text[:500]
                if resp.status_code in (400, 413, 422) and any(
                    h in text.lower() for h in _OVERFLOW_HINTS
                ):
                    raise _ItemOverflow(text)
                raise BadRequestError(f"{path}: HTTP {resp.status_code} {text}")
            return resp.json()
        assert last is not None
        raise last

    def _map(self, fn: Any, items: list[Any]) -> list[Any]:
        return list(self._pool.map(fn, items))

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
        def one(prompt: str) -> list[Completion]:
            body: dict[str, Any] = {
                "model": self._served_model,
                "prompt": prompt,
                "n": n,
                "temperature": temperature,
                "top_p": top_p if temperature > 0 else 1.0,
                "max_tokens": max_tokens,
            }
            if stop:
                body["stop"] = list(stop)
            if seed is not None:
                body["seed"] = seed
            try:
                data = self._post("/completions", body)
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
                out.append(
                    mark_empty(Completion(choice.get("text", ""), n_prompt, n_tokens, finish))
                )
            return out

        return self._map(one, prompts)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")

        def one(pair: tuple[str, str]) -> Score:
            prompt, continuation = pair
            body = {
                "model": self._served_model,
                "prompt": prompt + continuation,
                "max_tokens": 1,
                "temperature": 0.0,
                "echo": True,
                "logprobs": 0,
            }
            try:
                data = self._post("/completions", body)
            except _ItemOverflow:
                return failed_score(ContextOverflowError.reason)
            logprobs = data["choices"][0]["logprobs"]
            n_prompt = int(
                (data.get("usage") or {}).get("prompt_tokens", len(logprobs["tokens"]) - 1)
            )
            tokens = logprobs["tokens"][:n_prompt]  # drop the one generated token
            values = logprobs["token_logprobs"][:n_prompt]
            starts = logprobs["text_offset"][:n_prompt]
            ends = starts[1:] + [len(prompt) + len(continuation)]
            first = max(1, continuation_span(list(zip(starts, ends)), len(prompt)))
            lps = [float(v) for v in values[first:] if v is not None]
            return Score(sum(lps), lps, list(tokens[first:]))

        return self._map(one, list(zip(prompts, continuations)))

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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
