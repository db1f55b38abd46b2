"""The cold start, the one way `promptcot up`, the em stage and `promptcot train cold-start` run
it: annotated (c, z, x) triples from the shipped seed problems, made by the annotate stage's own
code (workers/stages/annotate.py): the teacher model when one is configured, else from the seed
itself, with no model (workers/annotation.py); then p_θ and q_φ fine-tuned on them
(``EMTrainer.cold_start``), and the solver on the same seeds' worked solutions in its answer
format (``solver_cold_start``: a verifier whose rollouts end in a final answer, and DPO's first
anchor). docs/training.md, "Cold start".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from streams.records import AnnotatedSeed, ModelUpdate, SeedProblem
from streams.topics import SEEDS_ANNOTATED
from trainer.heldout import is_heldout
from trainer.sft import Report

if TYPE_CHECKING:
    from promptcot.settings import Settings
    from trainer.em import EMTrainer
    from trainer.settings import TrainerSettings


@dataclass
class ColdStartData:
    seeds: list[AnnotatedSeed]  # the first N seeds of the source, annotated
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> seeds not annotated
    # Held-out seeds further on in the source, annotated to fill the held-out pool.
    heldout: list[AnnotatedSeed] = field(default_factory=list)
    # The seeds above with a worked solution, as the source has them: the solver's cold start.
    solved: list[SeedProblem] = field(default_factory=list)

    @property
    def triples(self) -> list[AnnotatedSeed]:
        """What the trainer's cold start takes (it trains on the seeds not held out)."""
        return self.seeds + self.heldout

    @property
    def success_rate(self) -> float:
        total = len(self.seeds) + sum(self.rejected.values())
        return len(self.seeds) / total if total else 0.0


def cold_start_data(
    settings: Settings, limit: int | None = None, report: Report | None = None
) -> ColdStartData:
    """The first ``trainer.cold_start.seeds`` (or ``limit``) seeds of the configured source,
    annotated in batches of the annotate stage's size; then held-out seeds further on until
    ``trainer.heldout_seeds`` held-out ones are annotated in all (the trainer never trains on
    them: they fill the held-out pool). At most twice that many are tried, so that a teacher
    that rejects most seeds does not annotate the whole source. ``report`` hears of each
    batch."""
    from workers.seeds import iter_seeds
    from workers.stages.annotate import AnnotateStage

    t = settings.trainer
    source = iter_seeds(t.cold_start.source, "train")
    first = list(islice(source, limit or t.cold_start.seeds))
    further = islice(
        (s for s in source if is_heldout(s.id, t.heldout_fraction)), 2 * t.heldout_seeds
    )
    tell = report or (lambda what, done, of: None)
    tell("loading the annotator", 0, 0)
    stage = AnnotateStage(settings)
    stage.ensure_ready()
    batch = settings.stage("annotate").batch_size

    def annotate(
        seeds: list[SeedProblem], rejected: Counter[str], what: str, before: int, of: int
    ) -> list[AnnotatedSeed]:
        done: list[AnnotatedSeed] = []
        for start in range(0, len(seeds), batch):
            tell(what, before + start, of)
            for emit in stage.process(seeds[start : start + batch]):
                if emit.topic is SEEDS_ANNOTATED:
                    done.append(emit.record)  # type: ignore[arg-type]
                else:
                    rejected[emit.record.reason] += 1  # type: ignore[attr-defined]
        tell(what, before + len(seeds), of)
        return done

    try:
        data = ColdStartData([])
        data.seeds = annotate(first, data.rejected, "annotating seeds", 0, len(first))
        by_id = {seed.id: seed for seed in first}
        held = sum(is_heldout(s.seed_id, t.heldout_fraction) for s in data.seeds)
        while held < t.heldout_seeds and (more := list(islice(further, t.heldout_seeds - held))):
            # held out, every one of them
            annotated = annotate(
                more, Counter(), "annotating held-out seeds", held, t.heldout_seeds
            )
            data.heldout += annotated
            held += len(annotated)
            by_id.update((seed.id, seed) for seed in more)
    finally:
        stage.close()
    data.solved = [s for a in data.triples if (s := by_id.get(a.seed_id)) and s.solution]
    return data


@dataclass
class ColdStart:
    """What one cold start did: the seeds it annotated and the versions it announces."""

    data: ColdStartData
    updates: list[ModelUpdate]


def on_first_start(trainer: TrainerSettings) -> bool:
    """Whether a starting loop (`promptcot up`, the em stage) runs the cold start itself."""
    return trainer.enabled and trainer.cold_start.enabled and trainer.cold_start.on_first_start


@dataclass(frozen=True)
class GoldSolution:
    """A seed's worked solution as the solver should write it (``solver_gold_solution``: its
    steps, then ``The answer is \\boxed{N}.``), in the shape of a verified trace."""

    id: str
    problem_id: str
    domain: str
    prompt: str
    completion: str


def gold_solutions(seeds: Sequence[SeedProblem]) -> list[GoldSolution]:
    from workers.annotation import solver_gold_solution

    return [
        GoldSolution(f"gold_{s.id}", s.id, s.domain, s.text, solver_gold_solution(s.solution))
        for s in seeds
        if s.solution
    ]


def _solver_loop(settings: Settings):
    from llm.roles import Role, model_path_for
    from trainer.traces import SolverColdStart

    return SolverColdStart(settings.trainer, model_path_for(settings.models, Role.SOLVER))


def solver_needs_cold_start(settings: Settings) -> bool:
    """The solver's cold start is on and the solver has no checkpoint yet."""
    from llm.roles import Role
    from trainer.checkpoints import CheckpointStore

    t = settings.trainer
    return t.cold_start.solver and CheckpointStore(t.checkpoint_dir).latest(Role.SOLVER) is None


def needs_cold_start(settings: Settings, trainer: EMTrainer) -> bool:
    """Some model the cold start trains has no checkpoint yet."""
    return trainer.needs_cold_start() or solver_needs_cold_start(settings)


def solver_cold_start(
    settings: Settings, data: ColdStartData, report: Report | None = None
) -> list[ModelUpdate]:
    """SFT of the solver on the cold-start seeds' worked solutions, one window with the cold
    start's step settings (trainer/traces.py ``SolverColdStart``): the base SmolLM2 ends 7 of 64
    rollouts with a final answer, so almost none can vote on a reference. Nothing when it is off,
    the solver has a checkpoint, or no seed has a solution."""
    if not solver_needs_cold_start(settings):
        return []
    gold = gold_solutions(data.solved)
    if not gold:
        return []
    (report or (lambda what, done, of: None))("training solver", 0, 0)
    return _solver_loop(settings).run_window(gold).updates


def cold_start(
    settings: Settings,
    trainer: EMTrainer,
    *,
    limit: int | None = None,
    force: bool = False,
    annotated: Callable[[ColdStartData], None] | None = None,
    report: Report | None = None,
) -> ColdStart | None:
    """The paper's cold start when p_θ, q_φ or the solver has no checkpoint yet (or ``force``):
    the seeds annotated (``cold_start_data``; ``annotated`` sees them before any training, and
    may refuse them by raising), then both models fine-tuned on them, then the solver on their
    worked solutions; ``report`` hears of each phase. None when every model has a checkpoint:
    there is nothing to do."""
    if not force and not needs_cold_start(settings, trainer):
        return None
    data = cold_start_data(settings, limit, report=report)
    if annotated is not None:
        annotated(data)
    updates = trainer.cold_start(data.triples, force=force, report=report)
    return ColdStart(data, updates + solver_cold_start(settings, data, report))
