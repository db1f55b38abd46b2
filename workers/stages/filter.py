"""candidates -> candidates.unique: exact and near-duplicate removal against every accepted
problem, and decontamination against the benchmark sets (n-gram overlap and embedding
similarity). A rejection names the nearest item and its similarity.

The worker that owns the single `candidates` partition makes every decision, so two replicas can
never both accept near-duplicates; the others are hot standbys (docs/vectorstore.md).
"""

from __future__ import annotations

from streams.records import CandidateProblem, Record
from streams.topics import CANDIDATES, CANDIDATES_UNIQUE, VERDICTS
from workers.stage import Emit, Stage


class FilterStage(Stage):
    name = "filter"
    input = CANDIDATES
    outputs = (CANDIDATES_UNIQUE, VERDICTS)

    def setup(self) -> None:
        from vectorstore.decontam import ContaminationIndex
        from vectorstore.dedup import DedupFilter
        from vectorstore.embedder import Embedder
        from vectorstore.store import ProblemStore

        cfg = self.settings.vectorstore
        embedder = Embedder(cfg.embedder)
        self.dedup = DedupFilter(
            embedder,
            ContaminationIndex.from_settings(embedder, cfg.decontam),
            ProblemStore(embedder.dim, cfg.store),
            cfg.dedup,
        )

    def process(self, records: list[Record]) -> list[Emit]:
        from vectorstore.dedup import CandidateText

        candidates = [r for r in records if isinstance(r, CandidateProblem)]
        decisions = self.dedup.check([
            CandidateText(
                id=c.id, text=c.problem, domain=c.domain,
                metadata={"concept_set_id": c.lineage.concept_set_id, "concepts": c.concepts},
            )
            for c in candidates
        ])
        emits = []
        for candidate, decision in zip(candidates, decisions, strict=True):
            if decision.accepted:
                emits.append(self.emit(CANDIDATES_UNIQUE, candidate))
            else:
                emits.append(self.reject(
                    candidate, decision.reason or "filtered",
                    nearest_id=decision.nearest_id, similarity=decision.similarity,
                ))
        return emits
