"""The model backend interface every stage talks to, its settings and its errors.

Prompts are rendered strings (the prompt layer applies the chat template). Whole-call failures
(the server is gone, too slow) raise a ``BackendError``; per-item failures (a prompt longer than
the context, an empty completion) are returned on the item with a reason code, so one bad prompt
never sinks its batch.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from llm.prompts import chatml
from streams import metrics
from streams.serde import valid_text
from streams.settings import Section

# ---------------------------------------------------------------------------------------------
# Errors

REASONS = ("unreachable", "timeout", "empty_completion", "context_overflow", "bad_request")


class BackendError(RuntimeError):
    """A model call that failed. ``reason`` is one of REASONS (a metric label)."""

    reason: str = "backend_error"

    def __init__(self, message: str = "", reason: str | None = None):
        super().__init__(message or (reason or self.reason))
        if reason is not None:
            self.reason = reason


class UnreachableError(BackendError):
    reason = "unreachable"


class BackendTimeoutError(BackendError):
    reason = "timeout"


class EmptyCompletionError(BackendError):
    reason = "empty_completion"


class ContextOverflowError(BackendError):
    reason = "context_overflow"


class BadRequestError(BackendError):
    reason = "bad_request"


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Completion:
    """One sampled continuation. ``error`` holds a reason code when the item failed (then
    ``finish_reason`` is "error" for a prompt that could not run, or the real finish reason for
    an empty completion)."""

    text: str
    n_prompt_tokens: int
    n_completion_tokens: int
    finish_reason: Literal["stop", "length", "error"]
    error: str | None = None

    def __post_init__(self) -> None:
        # Model text is valid UTF-8 from here on, whatever the backend: a server may send a lone
        # surrogate (byte-level decoding cut inside a character), which no record could carry
        # (docs/runtime.md). Every backend builds its completions here: one place.
        text, replaced = valid_text(self.text)
        if replaced:
            object.__setattr__(self, "text", text)
            metrics.MODEL_TEXT_REPLACED.inc(replaced)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(frozen=True)
class Score:
    """Teacher-forced log-likelihood of a continuation given its prompt (natural log)."""

    total_logprob: float
    token_logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def n_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def mean_logprob(self) -> float:
        return self.total_logprob / max(1, len(self.token_logprobs))


def failed_completions(n: int, reason: str, n_prompt_tokens: int = 0) -> list[Completion]:
    return [Completion("", n_prompt_tokens, 0, "error", reason) for _ in range(n)]


def failed_score(reason: str) -> Score:
    return Score(float("nan"), [], [], reason)


def mark_empty(c: Completion) -> Completion:
    """Flag a completion with no visible text (a model that emits EOS at once)."""
    if c.error is None and not c.text.strip():
        return Completion(
            c.text,
            c.n_prompt_tokens,
            c.n_completion_tokens,
            c.finish_reason,
            EmptyCompletionError.reason,
        )
    return c


def truncate_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; the stop string itself is dropped (as vLLM
    and the OpenAI API do)."""
    if not stop:
        return text, False
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def continuation_span(offsets: list[tuple[int, int]], prompt_chars: int) -> int:
    """Index of the first token of the continuation, given each token's (start, end) character
    span in prompt+continuation: the first token that ends past the prompt. A token that
    straddles the boundary (BPE merged the prompt's last chars with the continuation's first)
    belongs to the continuation, so every continuation character is scored exactly once."""
    for i, (_, end) in enumerate(offsets):
        if end > prompt_chars:
            return i
    return len(offsets)


def hash_files(paths: list[Path], length: int = 12) -> str:
    """Content hash of weight files (streamed: they can be GBs)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:length]


def adapter_base(model_dir: str | Path) -> str | None:
    """The base model a LoRA adapter folder sits on (None: not an adapter folder): peft's own
    ``base_model_name_or_path``, else the trainer's manifest (``checkpoint.json``,
    ``base_model``). An adapter goes on *its* base, never on whatever base a backend serves."""
    import json

    folder = Path(model_dir)
    config = folder / "adapter_config.json"
    if not config.is_file():
        return None
    for path, key in (
        (config, "base_model_name_or_path"),
        (folder / "checkpoint.json", "base_model"),
    ):
        try:
            base = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if base and Path(base).is_dir():
            return str(base)
    raise BadRequestError(f"{folder}: LoRA adapter whose base model folder cannot be found")


def weights_version(model_dir: str | Path) -> str:
    """``<folder name>@<sha256 of its weight files>`` (adapter folders included)."""
    path = Path(model_dir)
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return f"{path.name}@{hash_files(files) if files else 'noweights'}"


# ---------------------------------------------------------------------------------------------
# Settings


class BackendSettings(Section):
    """How one model role is served."""

    kind: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="in-process transformers, in-process vLLM, or HTTP"
    )
    model: str = Field(
        "", description="HF folder path (transformers/vllm) or served model name (openai)"
    )
    device: str = Field("cpu", description="torch device for transformers")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="float32 is fastest on CPUs without bf16 units"
    )
    max_model_len: int = Field(2048, description="context length; longer prompts are rejected")
    max_batch_size: int = Field(16, description="transformers: sequences per forward/generate")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: server root")
    api_key: str = Field("EMPTY", description="openai: bearer token")
    timeout_s: float = Field(120.0, description="openai: per request")
    max_retries: int = Field(3, description="openai: retries on connect errors, timeouts, 5xx")
    backoff_s: float = Field(0.5, description="openai: first retry delay, doubled each time")
    concurrency: int = Field(
        64, ge=1, description="openai: requests in flight per backend (its max_in_flight)"
    )
    tokenizer: str | None = Field(
        None, description="openai: local tokenizer folder for the chat template (else ChatML)"
    )
    seed: int = Field(0, description="vllm: engine seed")
    enable_lora: bool = Field(False, description="vllm: serve new weights as LoRA adapters")
    max_lora_rank: int = Field(16, description="vllm: largest adapter rank")
    gpu_memory_utilization: float = Field(0.85, description="vllm on GPU")
    extra_engine_args: dict = Field(
        default_factory=dict, description="vllm: passed to AsyncEngineArgs"
    )
    follow_checkpoints: bool | None = Field(
        None,
        description="move to each checkpoint the trainer announces; default: yes for the "
        "in-process kinds, no for openai (a server is rolled to new weights by its deployment, "
        "under the same served name)",
    )

    @property
    def follows_checkpoints(self) -> bool:
        if self.follow_checkpoints is not None:
            return self.follow_checkpoints
        return self.kind != "openai"


# ---------------------------------------------------------------------------------------------
# Interface


class Backend(ABC):
    """A text-in, text-out model. Implementations are thread-safe.

    What the stage runtime reads to keep the engine busy (docs/models.md, "Keeping engines
    saturated"): ``max_in_flight``, how many prompts the backend wants in flight at once, and
    ``continuous_batching``: True when concurrent ``generate``/``score`` calls from many threads
    are served together (then the runtime hands records over one by one from many threads),
    False when the backend batches only within one call (then the runtime sends whole
    micro-batches, one at a time).
    """

    settings: BackendSettings
    model_version: str  # model name/path + weights hash or adapter id; stamped on records
    continuous_batching: ClassVar[bool] = False

    @property
    def max_in_flight(self) -> int:
        """Prompts this backend wants in flight at once. Default: one batch of
        ``max_batch_size``, what a backend that batches within one call takes at a time."""
        return self.settings.max_batch_size

    @abstractmethod
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
        """``n`` completions per prompt, in prompt order. temperature 0 means greedy."""

    @abstractmethod
    def score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        """log p(continuation | prompt), summed and per token."""

    @abstractmethod
    def reload(self, model_path: str) -> None:
        """Serve new weights (a full model folder, or a LoRA adapter folder)."""

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        """Chat template with a generation prompt. Default: ChatML."""
        return chatml(messages)

    def close(self) -> None:
        """Free the model / connections."""
