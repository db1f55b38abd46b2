"""Make backends from settings, sharing one loaded instance between roles that name the same
model, and giving a role its own instance when it moves to new weights."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from llm.backends.base import Backend, BackendSettings

_cache: dict[str, Backend] = {}
_cache_lock = threading.Lock()


def _key(settings: BackendSettings) -> str:
    return settings.model_dump_json()


def new_backend(settings: BackendSettings) -> Backend:
    """A backend of its own, outside the shared cache (closing it affects no other user)."""
    if settings.kind == "transformers":
        from llm.backends.transformers_backend import TransformersBackend

        return TransformersBackend(settings)
    if settings.kind == "vllm":
        from llm.backends.vllm_backend import VLLMBackend

        return VLLMBackend(settings)
    if settings.kind == "openai":
        from llm.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings)
    raise ValueError(f"unknown backend kind {settings.kind!r}")


def make_backend(settings: BackendSettings) -> Backend:
    """The process-wide instance for these settings (loaded on first request)."""
    key = _key(settings)
    with _cache_lock:
        backend = _cache.get(key)
        if backend is None:
            backend = new_backend(settings)
            _cache[key] = backend
        return backend


def clear_cache() -> None:
    """Close and forget every cached backend (tests, shutdown)."""
    with _cache_lock:
        for backend in _cache.values():
            backend.close()
        _cache.clear()


class BackendPool:
    """Backends by role. Roles with equal settings share one instance; ``reload(role, path)``
    moves only that role to new weights (copy on write), so when the trainer publishes a new
    p_θ the solver that shared the base model keeps its weights. The copy is of the instance,
    not of the weights: in-process backends put every role's adapter on one shared base."""

    def __init__(
        self,
        roles: Mapping[str, BackendSettings],
        resolve: Callable[[str, BackendSettings], BackendSettings] | None = None,
    ):
        self.roles = dict(roles)
        # Settings -> the settings a backend is made with (llm/roles.py names the embedded
        # model there), applied when a role is first served, not for every role up front.
        self._resolve = resolve or (lambda role, settings: settings)
        self._by_role: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def settings(self, role: str) -> BackendSettings:
        return self._resolve(role, self.roles[role])

    def get(self, role: str) -> Backend:
        with self._lock:
            if role not in self._by_role:
                self._by_role[role] = make_backend(self.settings(role))
                self._label()
            return self._by_role[role]

    def _label(self) -> None:
        """Name each instance by the roles it serves (the memory account's component)."""
        roles: dict[int, list[str]] = {}
        for role, backend in self._by_role.items():
            roles.setdefault(id(backend), []).append(role)
        for backend in self._by_role.values():
            if hasattr(backend, "label"):
                backend.label = "serving " + "+".join(sorted(roles[id(backend)]))

    def versions(self) -> dict[str, str]:
        """role -> model_version of the roles loaded so far (stamped into record lineage)."""
        with self._lock:
            return {role: b.model_version for role, b in self._by_role.items()}

    def reload(self, role: str, model_path: str) -> Backend:
        current = self.get(role)
        with self._lock:
            # Shared: with another role here, or (from the process-wide cache) with another
            # pool whose roles are configured alike.
            shared = any(b is current for r, b in self._by_role.items() if r != role)
            with _cache_lock:
                shared = shared or any(b is current for b in _cache.values())
            if shared:
                # An instance of its own, outside the shared cache; in process it is a model
                # object on the same shared base weights plus the new adapter (llm/shared_base.py).
                fresh = new_backend(self.settings(role))
                fresh.reload(model_path)
                self._by_role[role] = fresh
                if hasattr(current, "label") and current not in self._by_role.values():
                    current.label = ""  # kept by the cache, serves no role of this pool now
                self._label()
                return fresh
        current.reload(model_path)
        return current
