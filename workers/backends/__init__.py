"""Model backends: one interface (``Backend``), three implementations (in-process transformers,
in-process vLLM, OpenAI-compatible HTTP), chosen per model role in settings."""

from workers.backends.base import (
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
from workers.backends.factory import BackendPool, clear_cache, make_backend
from workers.prompts import render_chat

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
