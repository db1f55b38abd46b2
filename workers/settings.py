"""Settings sections of the workers: how each stage runs, what it samples, how it verifies.

The root settings (promptcot/settings.py) compose these under their section names: ``sampler``,
``generation``, ``verify``, ``pairs``, ``traces``, ``rationale``, ``annotate``, ``sink``,
``concepts``; ``models`` (one backend per role) lives with the roles in llm/roles.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from streams.settings import Section
from verification.mathcheck import MathCheckSettings
from verification.sandbox import SandboxSettings

# The difficulty level each shipped seed corpus is written at. Annotated seeds carry it
# (AnnotatedSeed.difficulty, set by the annotate stage), so every prompt p_θ is trained or scored
# on names the level of the problem it is shown (the cold start, the E-step's scoring and the
# M-step's targets alike).
SEED_LEVELS: dict[str, str] = {"gsm8k": "grade school", "codeforces": "codeforces"}
# The sampler's ladders (concepts.difficulty_ladders) per trainer profile (trainer/settings.py,
# PROFILE_CONCEPTS): the cpu profile asks p_θ for the levels of the seeds it learns from, the gpu
# profile for the paper's competition levels.
SEED_LADDERS: dict[str, list[str]] = {
    "math": [SEED_LEVELS["gsm8k"]],
    "code": [SEED_LEVELS["codeforces"]],
}
MATH_LADDER = ["AMC12", "HMMT-Nov", "HMMT-Feb", "AIME", "USAJMO", "USAMO"]
# The shipped Codeforces seeds carry no ratings: rating buckets 400 apart (Div. 2 B up to Div. 1
# D) tell the prompt model more than upstream's single "codeforces" label.
CODE_LADDER = [
    "codeforces-1200",
    "codeforces-1600",
    "codeforces-2000",
    "codeforces-2400",
    "codeforces-2800",
]


# Decode budget of a rationale (p_θ's, q_φ's samples, the M-step's greedy decode), in tokens: the
# cold-start rationales (workers/annotation.py) run 57-208 SmolLM2 tokens with their closing
# delimiter over all of GSM8K train, 105-168 on the cpu held-out pool (`python -m bench --case
# budgets`). A budget under them truncates samples, and truncated samples are dropped: best-of-K
# then selects for short rationales, and a designer cut off before "so the answer is N" states
# no answer. Above the longest, so none is cut.
RATIONALE_TOKENS = 224


class StageRuntime(Section):
    """Micro-batching and parallelism of one stage (workers/agent.py): take up to batch_size
    records or wait batch_within_s, keep up to in_flight records in process at once."""

    batch_size: int = Field(8, ge=1)
    batch_within_s: float = Field(0.5, gt=0)
    # Records in process at once, across micro-batches. None: sized by the stage (a
    # continuous-batching server: its concurrency; otherwise four micro-batches, so sends and
    # broker acknowledgements overlap the next batch's work: Stage.default_in_flight).
    in_flight: int | None = Field(None, ge=1)
    # A record whose processing raises (not a model's bad output: a bug or a poison record) is
    # tried this many times, then dead-lettered with the error. Trainer stages retry the window.
    max_attempts: int = Field(3, ge=1)


class WorkerSettings(Section):
    """What every worker process shares: shutdown, and the journal of decisions."""

    # On SIGTERM: stop taking input, let records in process finish for up to this long, commit,
    # leave. Kubernetes waits 30 s (terminationGracePeriodSeconds) before SIGKILL.
    shutdown_grace_s: float = Field(20.0, ge=0)
    # The journal keeps the outputs of every input id a stage decided (workers/journal.py), so a
    # redelivery re-emits the same records instead of deciding again. One SQLite file per stage;
    # processes of one stage share it on one machine (see docs/runtime.md for clusters).
    journal_dir: Path = Path("promptcot-output/journal")
    journal_retention_days: float = Field(30.0, gt=0)
    # Transient failures (a model server down, a full disk) are retried with backoff, not
    # dead-lettered: they are not the record's fault.
    retry_backoff_s: float = Field(1.0, gt=0)
    retry_backoff_max_s: float = Field(60.0, gt=0)


class ConceptSettings(Section):
    """The concept pool and PromptCoT 1.0's concept-set sampler (workers/concepts.py)."""

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
    pool_path: Path | None = None  # None: the pool shipped in corpora/concepts/pool.json
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
                raise ValueError(
                    f"difficulty_weights[{domain!r}] must be non-negative, not all zero"
                )
        return self


class SamplerSettings(Section):
    """The concept-set source: how many to issue and how many may be in flight."""

    max_in_flight: int = 8
    max_issued: int | None = None  # None: run until stopped
    domains: list[Literal["math", "code"]] = Field(default_factory=lambda: ["math"])


class GenerationSettings(Section):
    """p_θ sampling for synthesis."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_rationale_tokens: int = RATIONALE_TOKENS
    max_problem_tokens: int = 160


class VerifySettings(Section):
    rollouts: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    # Difficulty band on the pass rate (the paper's rule: solved sometimes, at most half the time).
    min_pass_rate: float = 0.0  # exclusive
    max_pass_rate: float = 0.5  # inclusive
    test_rounds: int = 4  # code: test-writer calls per problem
    # Math with a teacher (verify.math.reference "teacher", or "auto" with models.teacher set):
    # the teacher's rollouts per problem; their majority is the reference.
    teacher_rollouts: int = Field(4, ge=1)
    teacher_temperature: float = 0.7
    teacher_max_tokens: int = Field(1024, ge=1)
    # Drift gauges (streams/metrics.py): measured over the last this-many accepted problems.
    drift_window: int = Field(64, ge=2)
    math: MathCheckSettings = Field(default_factory=MathCheckSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)


class PairSettings(Section):
    max_pairs_per_problem: int = 4


class TraceSettings(Section):
    """Verified solutions for solver SFT (workers/stages/traces.py)."""

    max_solver_traces_per_problem: int = Field(4, ge=0)


class RationaleSettings(Section):
    """E-step sampling: K rationales per seed from q_φ, scored by p_θ."""

    samples: int = 8
    temperature: float = 1.0
    max_tokens: int = RATIONALE_TOKENS


class AnnotateSettings(Section):
    """Cold start: concepts + rationale for each seed."""

    # The embedded default has no teacher LLM good enough to name concepts: the shipped lexicon
    # does it; point `models.annotator` at a strong model and set "model" in production.
    concept_source: Literal["model", "lexicon"] = "lexicon"
    # Where the rationale comes from: "model" (the teacher, models.annotator), "solution"
    # (derived from the seed's worked solution, no model: workers/annotation.py), or "auto":
    # the teacher when one is configured (models.annotator.model set, or concept_source
    # "model"), else the solution.
    rationale_source: Literal["auto", "model", "solution"] = "auto"
    rationale_max_chars: int = Field(480, ge=80)  # derived rationales (fits the synthesis budget)
    concepts_per_seed: int = 5
    temperature: float = 0.0
    max_tokens: int = 192

    @model_validator(mode="after")
    def _check_sources(self) -> AnnotateSettings:
        # A rationale derived from the solution uses the lexicon's concepts (workers/annotation.py)
        if self.concept_source == "model" and self.rationale_source == "solution":
            raise ValueError(
                'concept_source "model" needs the teacher, but rationale_source "solution" uses '
                'no model: set rationale_source to "model" or "auto", or concept_source to '
                '"lexicon"'
            )
        return self


class SinkSettings(Section):
    output_dir: Path = Path("promptcot-output")
