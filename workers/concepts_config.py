"""Settings of the concept pool and the concept-set sampler (imported by the global settings, so
this module imports nothing but pydantic).

Difficulty ladders: math uses the competition ladder of PromptCoT 1.0/2.0. The shipped Codeforces
seeds carry no ratings, so code uses Codeforces rating buckets (``codeforces-1200`` ...
``codeforces-2800``, 400 apart: Div. 2 B up to Div. 1 D), which tell the prompt model more than
upstream's single "codeforces" label while staying a label it can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MATH_LADDER = ["AMC12", "HMMT-Nov", "HMMT-Feb", "AIME", "USAJMO", "USAMO"]
CODE_LADDER = ["codeforces-1200", "codeforces-1600", "codeforces-2000", "codeforces-2400", "codeforces-2800"]


class ConceptSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set_size: int = Field(5, ge=1)
    # softmax(score / temperature) over candidates; 0.2 is PromptCoT 1.0's value.
    temperature: float = Field(0.2, gt=0)
    # score = cooccurrence_weight * association(candidate, chosen) + embedding_weight * cosine(
    # candidate, mean of chosen); assoc is in [0, 1], cosine in [-1, 1] (see workers/concepts.py).
    cooccurrence_weight: float = Field(1.0, ge=0)
    embedding_weight: float = Field(1.0, ge=0)
    # log_count: log(1 + n_ij) / log(1 + max n); npmi: positive normalized PMI. log_count gives
    # the more coherent sets on the shipped pool (measurements in workers/concepts.py).
    cooccurrence_measure: Literal["log_count", "npmi"] = "log_count"
    difficulty_ladders: dict[str, list[str]] = Field(
        default_factory=lambda: {"math": list(MATH_LADDER), "code": list(CODE_LADDER)}
    )
    # Optional relative weights per ladder rung (same length as the ladder); None = uniform.
    difficulty_weights: dict[str, list[float]] | None = None
    pool_path: Path | None = None  # None: the pool shipped in workers/data/concepts/pool.json
    seed: int = 0  # draw k of a sampler is a pure function of (pool, settings, seed, k)

    @model_validator(mode="after")
    def _check_ladders(self) -> ConceptSettings:
        for domain, ladder in self.difficulty_ladders.items():
            if not ladder:
                raise ValueError(f"difficulty ladder for {domain!r} is empty")
        for domain, weights in (self.difficulty_weights or {}).items():
            ladder = self.difficulty_ladders.get(domain)
            if ladder is None or len(weights) != len(ladder):
                raise ValueError(f"difficulty_weights[{domain!r}] must match its ladder's length")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"difficulty_weights[{domain!r}] must be non-negative, not all zero")
        return self
