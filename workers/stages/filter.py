"""candidates -> candidates.unique: exact and near-duplicate removal against every accepted
problem, and decontamination against the benchmark sets (n-gram overlap, embedding similarity,
and a judge for reworded benchmark problems in the gray zone under the embedding threshold). A
rejection names the nearest item and its similarity; every pair the judge saw, and its verdict,
is in the candidate's lineage (``lineage.judgments``), accepted or not.

The worker that owns the single `candidates` partition makes every decision, so two replicas can
never both accept near-duplicates; the others are hot standbys (docs/vectorstore.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from llm.backends.base import Backend
from streams import metrics
from streams.records import CandidateProblem, Judgment
from streams.topics import CANDIDATES, CANDIDATES_UNIQUE, VERDICTS
from workers.stage import Emit, Stage

if TYPE_CHECKING:
    from promptcot.settings import Settings

log = logging.getLogger(__name__)


class FilterStage(Stage[CandidateProblem]):
    name = "filter"
    input = CANDIDATES
    outputs = (CANDIDATES_UNIQUE, VERDICTS)

    def __init__(self, settings: Settings, backends: Mapping[str, Backend] | None = None):
        super().__init__(settings)
        # The judge role's backend may be handed in (a scripted one in tests); a plain Stage, not
        # a ModelStage: the filter's decisions stay one batch at a time whatever serves the judge.
        self._backends = dict(backends or {})

    def setup(self) -> None:
        from vectorstore.decontam import ContaminationIndex
        from vectorstore.dedup import DedupFilter
        from vectorstore.embedder import Embedder
        from vectorstore.store import ProblemStore
        from workers.judge import build_judge

        cfg = self.settings.vectorstore
        embedder = Embedder(cfg.embedder)
        contamination = ContaminationIndex.from_settings(embedder, cfg.decontam)
        self.dedup = DedupFilter(
            embedder,
            contamination,
            ProblemStore(embedder.dim, cfg.store),
            cfg.dedup,
            judge=build_judge(self.settings, (i.text for i in contamination.items), self._backends),
        )
        from workers.diversity_window import DiversityWindow

        self.window = DiversityWindow(256)
        self._seed_centroid: np.ndarray | None = None  # 128 GSM8K seeds, embedded on first use
        self._pool = None

    def process(self, records: list[CandidateProblem]) -> list[Emit]:
        from vectorstore.dedup import CandidateText

        candidates = records
        verdicts_before = dict(self.dedup.verdicts)
        screened = self.dedup.embed_and_screen(
            [
                CandidateText(
                    id=c.id,
                    text=c.problem,
                    domain=c.domain,
                    metadata={"concept_set_id": c.lineage.concept_set_id, "concepts": c.concepts},
                )
                for c in candidates
            ]
        )
        decisions = self.dedup.decide_and_commit(screened)
        self._count_judged(verdicts_before)
        self._update_diversity(candidates, screened, decisions)
        emits = []
        for candidate, decision in zip(candidates, decisions, strict=True):
            if decision.judged:
                candidate = _with_judgments(candidate, decision.judged, self.name)
            if decision.accepted:
                emits.append(self.emit(CANDIDATES_UNIQUE, candidate))
            else:
                emits.append(
                    self.reject(
                        candidate,
                        decision.reason or "filtered",
                        nearest_id=decision.nearest_id,
                        similarity=decision.similarity,
                    )
                )
        return emits

    def _count_judged(self, before: dict[str, int]) -> None:
        for verdict, count in self.dedup.verdicts.items():
            if count > before[verdict]:
                metrics.JUDGED_PAIRS.labels(verdict=verdict).inc(count - before[verdict])

    def _update_diversity(self, candidates, screened, decisions) -> None:
        """Rolling diversity gauges over accepted problems; monitoring never fails the batch."""
        kept = [
            (s.vector, c.concepts)
            for c, s, d in zip(candidates, screened, decisions, strict=True)
            if d.accepted and s.vector is not None
        ]
        if not kept or self.window is None:
            return
        try:
            if self._seed_centroid is None:
                from workers.concepts import load_pool
                from workers.seeds import load_seeds

                seeds = [s.text for s in load_seeds("gsm8k", "train", 128)]
                self._seed_centroid = self.dedup.embedder.embed(seeds).mean(axis=0)
                self._pool = load_pool(self.settings.concepts.pool_path)
            self.window.add(np.stack([v for v, _ in kept]), [c for _, c in kept])
            for measure, value in self.window.measures(self._seed_centroid, self._pool).items():
                metrics.DIVERSITY.labels(measure=measure).set(value)
        except Exception:
            log.exception("diversity gauges disabled")
            self.window = None


def _with_judgments(candidate: CandidateProblem, judged, stage: str) -> CandidateProblem:
    """The candidate (same id) with the judge's verdicts added to its lineage."""
    judgments = [
        Judgment(
            stage=stage,
            other_id=j.benchmark_id,
            similarity=round(j.similarity, 4),
            same=j.verdict.same,
            judge=j.verdict.judge,
            template=j.verdict.template,
            detail=j.verdict.detail,
            malformed=j.verdict.malformed,
        )
        for j in judged
    ]
    lineage = candidate.lineage.model_copy(
        update={"judgments": [*candidate.lineage.judgments, *judgments]}
    )
    return candidate.model_copy(update={"lineage": lineage})
