"""The stage registry: every stage of the factory, in the order records flow, with its class and
its default micro-batching. The one place that names them all (the CLI, ``promptcot up``, the
``stages`` settings section and the tests read it from here).

A table and nothing else: classes are named by import path, and promptcot/startup.py imports
them on demand, so ``promptcot worker sink`` never loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.settings import PROFILE_WINDOWS
from workers.settings import StageRuntime


@dataclass(frozen=True)
class StageSpec:
    target: str  # "module:Class"
    runtime: StageRuntime = field(default_factory=StageRuntime)  # default micro-batching
    trainer: bool = False  # part of the training loop rather than the data path
    doc: str = ""


def _rt(batch_size: int, within: float) -> StageRuntime:
    return StageRuntime(batch_size=batch_size, batch_within_s=within)


STAGES: dict[str, StageSpec] = {
    "annotate": StageSpec(
        "workers.stages.annotate:AnnotateStage",
        _rt(8, 1.0),
        doc="seeds -> concepts + rationale (cold-start data)",
    ),
    "rationale": StageSpec(
        "workers.stages.rationale:RationaleStage",
        _rt(4, 1.0),
        doc="annotated seeds -> K scored q_φ rationales (E-step sampling)",
    ),
    "sampler": StageSpec(
        "workers.stages.sampler:SamplerStage",
        doc="verdicts -> new concept sets (keeps a window in flight)",
    ),
    "generate": StageSpec(
        "workers.stages.generate:GenerateStage",
        _rt(8, 1.0),
        doc="concept sets -> candidate problems (p_θ)",
    ),
    "filter": StageSpec(
        "workers.stages.filter:FilterStage",
        _rt(32, 0.5),
        doc="candidates -> unique, uncontaminated candidates",
    ),
    "verify": StageSpec(
        "workers.stages.verify:VerifyStage",
        _rt(4, 1.0),
        doc="unique candidates -> verdicts (solve, vote, test, sandbox)",
    ),
    "pairs": StageSpec(
        "workers.stages.pairs:PairsStage", doc="accepted verdicts -> DPO preference pairs"
    ),
    "traces": StageSpec(
        "workers.stages.traces:TracesStage",
        doc="accepted verdicts -> verified solutions for solver SFT",
    ),
    "sink": StageSpec(
        "workers.stages.sink:SinkStage", doc="accepted verdicts -> problems topic + Parquet"
    ),
    # Trainer windows are long, or a trickle of records arrives in windows too small to train on;
    # the trainer profile sizes them (trainer/settings.py, PROFILE_WINDOWS; these are the gpu ones).
    "em": StageSpec(
        "trainer.stages:EStepStage",
        StageRuntime(**PROFILE_WINDOWS["gpu"]["em"]),
        trainer=True,
        doc="cold start, then rationale windows -> E-step (q_φ) + M-step (p_θ), next epoch",
    ),
    "dpo": StageSpec(
        "trainer.stages:DPOStage",
        StageRuntime(**PROFILE_WINDOWS["gpu"]["dpo"]),
        trainer=True,
        doc="pair windows -> DPO of the solver",
    ),
    "sft": StageSpec(
        "trainer.stages:SolverSFTStage",
        StageRuntime(**PROFILE_WINDOWS["gpu"]["sft"]),
        trainer=True,
        doc="verified-trace windows -> SFT of the solver (one lineage with dpo)",
    ),
}
TRAINER_STAGES = tuple(name for name, spec in STAGES.items() if spec.trainer)
DATA_STAGES = tuple(name for name, spec in STAGES.items() if not spec.trainer)
