"""Math verification knobs (composed into the global Settings as ``verify.math``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from streams.settings import Section


class MathCheckSettings(Section):
    """Math verification knobs (``verify.math``: ``VerifySettings`` in ``workers/settings.py``)."""

    # Where the reference answer comes from (verification/mathcheck/reference.py): "auto" is the
    # teacher where models.teacher is configured, else the designer's stated, checked answer;
    # "majority" (the solver's own plurality) is self-agreement, not verification: opt-in only.
    reference: Literal["auto", "teacher", "designer", "majority"] = "auto"
    min_agreement: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description='reference "majority": share of ALL rollouts the plurality cluster needs '
        "to become the reference.",
    )
    teacher_min_agreement: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description='reference "teacher": share of the teacher\'s rollouts its majority cluster '
        "needs to become the reference.",
    )
    designer_min_steps: int = Field(
        1,
        ge=0,
        description='reference "designer": arithmetic steps of the rationale that must check '
        'before its stated answer is a reference (0: a bare "so the answer is N" counts).',
    )
    equivalence_timeout_s: float = Field(
        2.0, gt=0.0, description="Wall-clock bound on one equivalence check in the worker process."
    )
    vote_budget_s: float = Field(
        4.0,
        gt=0.0,
        description="Seconds of equivalence checking one vote (one record) may wait for in all; "
        "checks past it count as not equivalent. Hostile answers (power towers that hang "
        "sympy) cost a vote this much, not a timeout and a worker restart per pair.",
    )
    worker_start_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="Bound on starting the worker (imports sympy; slow on busy hosts).",
    )
    max_answer_chars: int = Field(
        512,
        ge=1,
        description="Longer answers are equal only to identical text (never parsed): final "
        "answers are short, long ones are derivation spill-over and slow to parse.",
    )
    cache_size: int = Field(100_000, ge=0, description="Normalized pairs remembered per oracle.")
