"""Trainer settings: one settings section the root settings compose (``settings.trainer``), with
a config per training step, sized for the machine by a named profile (docs/training.md).

- ``gpu``: the paper's settings (cold start lr 2e-5, batch 16, 2 epochs; EM steps lr 2e-6, batch
  16; DPO lr 1e-6, batch 16), full fine-tuning, bf16 mixed precision. The class defaults below
  are these learning rates and batch sizes, with float32 (``dtype``): bf16 comes from the
  profile (``PROFILES["gpu"]``).
- ``cpu``: what moves a 135M model measurably within minutes on a few cores: LoRA adapters,
  short sequences, small windows and learning rates in LoRA's range (the paper's rates are for
  7B+ models and barely move a small one: docs/training.md has the measurements).

``profile: auto`` (the default) picks ``gpu`` when an NVIDIA device is visible and ``cpu``
otherwise. A profile only fills keys the user did not set: any key given in YAML, the
environment or code wins over it. The profile also sizes the trainer stages' windows
(``stages.em`` / ``stages.dpo``, applied by the root settings from ``PROFILE_WINDOWS``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from streams.settings import Section, deep_merge
from workers.settings import CODE_LADDER, MATH_LADDER, RATIONALE_TOKENS, SEED_LADDERS

Profile = Literal["cpu", "gpu"]
# The benchmarks trainer/evaluate.py scores (with reference answers shipped in corpora/).
Benchmark = Literal["gsm8k", "aime24", "aime25", "hmmt25"]


class LoraConfig(Section):
    """peft LoRA shape, used when a step sets ``use_lora``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


class StepConfig(Section):
    """What every training step shares. ``lr`` is for full fine-tuning; LoRA usually wants a
    learning rate ~10-100x higher (set it explicitly when you switch ``use_lora`` on).

    A window is ``steps_per_window`` optimiser steps of ``batch_size`` records (drawn in
    shuffled passes over the window's records), or, when that is not set, ``epochs`` passes over
    them (trainer/engine.py). Each role keeps one optimiser across windows and restarts."""

    enabled: bool = True
    lr: float = 2e-6
    batch_size: int = 16  # records per optimiser step (across data-parallel ranks)
    per_device_batch_size: int = 4  # memory knob: micro-batches accumulate to batch_size
    steps_per_window: int | None = Field(None, ge=1)  # None: ``epochs`` passes
    epochs: float = Field(1.0, gt=0)
    max_seq_len: int = 1024
    use_lora: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Linear warm-up over the role's first N optimiser steps (a stream has no end to decay to).
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


class WindowConfig(Section):
    """The smallest window worth a training run. The window itself is the runtime's micro-batch
    of the stage: ``settings.stages["em"|"dpo"]`` (batch_size records or batch_within_s)."""

    min_records: int = 8


class ColdStartConfig(StepConfig):
    """SFT of both models on annotated (c, z, x) triples (paper: lr 2e-5, batch 16, 2 epochs).

    The triples come from the first ``seeds`` problems of ``source`` (its train split),
    annotated like the annotate stage does: by the teacher when one is configured, else from the
    seed itself (docs/training.md, "Cold start")."""

    lr: float = 2e-5
    epochs: float = 2.0
    on_first_start: bool = True  # `up` and the em stage run it when a model has no checkpoint yet
    source: Literal["gsm8k"] = "gsm8k"
    seeds: int = Field(512, ge=1)
    # The solver too, on the same seeds' worked solutions in its answer format (its first
    # version, and DPO's first anchor): trainer/coldstart.py ``solver_cold_start``.
    solver: bool = True


class EStepConfig(StepConfig):
    """Best-of-K rejection fine-tuning of q_φ on (c, x) -> z_best (paper: lr 2e-6, batch 16).
    Its window is the EM window: the stage runs the E-step and then the M-step on it."""

    lr: float = 2e-6
    window: WindowConfig = Field(default_factory=WindowConfig)
    min_seeds: int = 1  # distinct seeds a window needs after best-of-K


class MStepConfig(StepConfig):
    """Fine-tune p_θ on c -> (z, x), z decoded greedily from the updated q_φ."""

    lr: float = 2e-6
    max_rationale_tokens: int = RATIONALE_TOKENS  # greedy decode budget for z
    generation_batch_size: int = 8


class DPOConfig(StepConfig):
    """Self-play DPO of the solver on preference pairs (paper: lr 1e-6, batch 16), against a
    pinned reference (the anchor, trainer/anchor.py): the solver's newest SFT version (or its
    base), re-pinned to the current policy every ``anchor_refresh_windows`` DPO windows."""

    lr: float = 1e-6
    beta: float = 0.1
    # Weight of an SFT term (mean NLL per token of the chosen answer) beside the preference
    # loss, as TRL's loss_type=["sigmoid", "sft"]: keeps a small model from drifting into
    # repetition while it pushes the rejected answers down.
    sft_weight: float = Field(0.0, ge=0)
    anchor_refresh_windows: int = Field(16, ge=0)  # 0: only an SFT version moves the anchor
    window: WindowConfig = Field(default_factory=lambda: WindowConfig(min_records=4))


class SolverSFTConfig(StepConfig):
    """Fine-tuning of the solver on verified traces (the ``sft`` stage), the same solver lineage
    DPO trains: its versions are the anchors DPO is measured against."""

    lr: float = 1e-6
    window: WindowConfig = Field(default_factory=lambda: WindowConfig(min_records=4))


class EvalConfig(Section):
    """The solver on a fixed benchmark item set after each DPO update (trainer/evaluate.py;
    ``promptcot eval`` runs the same on demand): accuracy, and the gold solutions' NLL."""

    after_dpo: bool = False
    benchmark: Benchmark = "gsm8k"
    # "subset": GSM8K's fixed 300 test problems (corpora/gsm8k/test-subset-300.json); "all":
    # the whole test split. The other benchmarks are always whole.
    items: Literal["subset", "all"] = "subset"
    limit: int | None = Field(20, ge=1)  # the first N items of the set (None: all of them)
    solve: bool = True  # generate and score solutions (False: the gold NLL alone)
    gold_nll: bool = True  # the gold solutions' NLL (GSM8K; one forward pass per item)
    max_tokens: int = 256
    batch_size: int = Field(8, ge=1)


class TrainerSettings(Section):
    """``settings.trainer``."""

    profile: Literal["auto", "cpu", "gpu"] = "auto"  # resolved when the settings load
    enabled: bool = True  # master switch: False makes every trainer stage skip its windows
    checkpoint_dir: Path = Path("promptcot-output/checkpoints")
    # Checkpoints kept per role (older ones are pruned after each save; their manifests are
    # kept, so a redelivered window is still recognised). Full SmolLM2 folders are ~540 MB in
    # float32; LoRA adapters are a few MB.
    keep_last: int = 2
    heldout_fraction: float = 0.1  # seeds / pairs (by id hash) never trained on: the signals
    # The held-out seed pool's size: the cold start fills it from the seed source, so that p_θ's
    # NLL and q_φ's reward are measured on the same seeds from the first version on (0: no
    # pool, the signals are measured on the window's own seeds).
    heldout_seeds: int = Field(16, ge=0)
    # Mixed precision of training and scoring. Weights being trained stay float32 (bf16 master
    # weights would round EM-sized updates away); a LoRA base is loaded in this dtype.
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"  # "auto": cuda when available, else cpu
    max_epochs: int | None = None  # passes of the EM loop over the seed set; None: no limit
    torch_threads: int | None = None  # None: leave torch's default
    seed: int = 0
    # Rows of the LM head computed at once in a loss (completion positions only): the logits
    # a training step holds are this x the vocabulary, never batch x sequence x vocabulary.
    loss_chunk_tokens: int = Field(1024, ge=1)
    # Recompute each layer's activations in backward instead of keeping them (about a third
    # more compute): what a step holds is then about one layer's activations, not every layer's.
    gradient_checkpointing: bool = False
    # The optimiser's moments in every checkpoint (optimizer.pt: 2x the trainable weights in
    # float32; a full-FT 1.7B model: 13.6 GB a checkpoint). Off: a restart keeps the step
    # count but starts fresh moments.
    save_optimizer: bool = True
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig)
    e_step: EStepConfig = Field(default_factory=EStepConfig)
    m_step: MStepConfig = Field(default_factory=MStepConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    sft: SolverSFTConfig = Field(default_factory=SolverSFTConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("profile", "auto") not in ("auto", "cpu", "gpu"):
            return data  # a bad profile is reported by the field, with its path
        profile = resolve_profile(data.get("profile", "auto"))
        return {**deep_merge(PROFILES[profile], data), "profile": profile}


def cuda_visible() -> bool:
    """An NVIDIA device this process may use, without importing torch (settings load in every
    command): ``CUDA_VISIBLE_DEVICES`` empty or -1 hides them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_profile(profile: str) -> Profile:
    if profile == "auto":
        return "gpu" if cuda_visible() else "cpu"
    if profile not in ("cpu", "gpu"):
        raise ValueError(f"unknown trainer profile {profile!r} (auto, cpu, gpu)")
    return profile  # type: ignore[return-value]


def _steps(lr: dict[str, float], **common: Any) -> dict[str, Any]:
    return {step: {"lr": rate, **common} for step, rate in lr.items()}


# Keys each profile sets under ``trainer``. Both profiles name the same keys: whichever profile
# the defaults were resolved with, the chosen one replaces all of them (only keys the user set
# explicitly win over a profile).
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": deep_merge(
        _steps(
            {"cold_start": 2e-5, "e_step": 2e-6, "m_step": 2e-6, "dpo": 1e-6, "sft": 1e-5},
            use_lora=False,
            batch_size=16,
            per_device_batch_size=4,
            steps_per_window=None,  # the paper's epochs over windows of 64 / 32 records
            max_seq_len=1024,
        ),
        {
            "dtype": "bfloat16",
            "keep_last": 2,
            "cold_start": {"epochs": 2.0, "seeds": 512, "batch_size": 16},
            "e_step": {"window": {"min_records": 8}},
            "m_step": {"max_rationale_tokens": RATIONALE_TOKENS},
            "dpo": {"window": {"min_records": 4}},
            "sft": {"window": {"min_records": 8}},
        },
    ),
    "cpu": deep_merge(
        _steps(
            {"cold_start": 1e-3, "e_step": 5e-4, "m_step": 5e-4, "dpo": 2e-4, "sft": 5e-4},
            use_lora=True,
            batch_size=4,
            per_device_batch_size=4,
            # Windows of 4-8 records: several steps each, on one optimiser per role (one step
            # a window from fresh moments was lr * sign(grad); docs/training.md, "The engine").
            steps_per_window=8,
            max_seq_len=512,
        ),
        {
            # These CPUs have no bf16 units: emulated bf16 is slower than float32.
            "dtype": "float32",
            # Each layer's activations recomputed in backward: a cold start's peak RSS 8.1 GB ->
            # 4.0 GB on SmolLM2 (4 sequences of up to 512 tokens a step), the same weights
            # (docs/models.md, "Memory").
            "gradient_checkpointing": True,
            "keep_last": 3,
            # 32 seeds, one pass, 4 a step: 8 steps a model, minutes on 2 cores (the format is
            # what a 135M model learns first).
            "cold_start": {"epochs": 1.0, "seeds": 32, "batch_size": 4, "steps_per_window": None},
            "e_step": {"window": {"min_records": 4}},
            "m_step": {"max_rationale_tokens": RATIONALE_TOKENS},
            "dpo": {"window": {"min_records": 2}},
            "sft": {"window": {"min_records": 2}},
        },
    ),
}

# E-step sampling per profile (the rationale stage, ``rationale.*``): on a CPU, K=8 rationales
# per seed take the rationale stage longer than a README run lasts, so no EM window would ever
# form; 4 close one within minutes. The budget is the same everywhere: it must fit the cold-start
# rationales (workers/settings.py, RATIONALE_TOKENS), or best-of-K selects for short ones.
PROFILE_SAMPLING: dict[str, dict[str, Any]] = {
    "gpu": {"samples": 8, "max_tokens": RATIONALE_TOKENS},
    "cpu": {"samples": 4, "max_tokens": RATIONALE_TOKENS},
}

# The sampler's difficulty ladders per profile (``concepts.difficulty_ladders``). A level means
# something to p_θ only if its training prompts named it: the cold start, the E-step and the
# M-step show p_θ each seed's own level (workers/settings.py, SEED_LEVELS: GSM8K is "grade
# school"), so the cpu profile, the embedded default, asks for exactly those. The gpu profile
# keeps the paper's competition ladder, meant for seeds annotated with those levels (the sampler
# warns when its ladder names a level no shipped seed carries).
PROFILE_CONCEPTS: dict[str, dict[str, Any]] = {
    "gpu": {"difficulty_ladders": {"math": list(MATH_LADDER), "code": list(CODE_LADDER)}},
    "cpu": {"difficulty_ladders": {d: list(ladder) for d, ladder in SEED_LADDERS.items()}},
}

# The trainer stages' windows per profile (``stages.em`` / ``stages.dpo``): on a CPU a window
# must close within minutes, or the first model update of a run comes too late to matter.
PROFILE_WINDOWS: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {
        "em": {"batch_size": 64, "batch_within_s": 600.0},
        "dpo": {"batch_size": 32, "batch_within_s": 600.0},
        "sft": {"batch_size": 64, "batch_within_s": 600.0},
    },
    "cpu": {
        "em": {"batch_size": 24, "batch_within_s": 180.0},
        "dpo": {"batch_size": 8, "batch_within_s": 120.0},
        "sft": {"batch_size": 8, "batch_within_s": 120.0},
    },
}
