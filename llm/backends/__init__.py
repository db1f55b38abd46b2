"""Model backends: one interface (``Backend``), three implementations (in-process transformers,
in-process vLLM, OpenAI-compatible HTTP), chosen per model role in settings."""

from llm.backends.base import (
    Backend,
    BackendError,
    BackendSettings,
    BackendTimeoutError,
    BadRequestError,
    Completion,
    ContextOverflowError,
    EmptyCompletionError,
    Score,
    UnreachableError,
)
from llm.backends.pool import BackendPool, clear_cache, make_backend
from llm.prompts import render_chat

__all__ = [
    "Backend",
    "BackendError",
    "BackendPool",
    "BackendSettings",
    "BackendTimeoutError",
    "BadRequestError",
    "Completion",
    "ContextOverflowError",
    "EmptyCompletionError",
    "Score",
    "UnreachableError",
    "clear_cache",
    "make_backend",
    "render_chat",
]
