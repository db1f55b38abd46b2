"""The concept-set source. It keeps ``max_in_flight`` concept sets open: it primes the pipeline at
start and issues one new set for every verdict that closes one of its own, so a slow verifier
slows the sampler instead of growing an unbounded backlog."""

from __future__ import annotations

import itertools
import threading

from streams import metrics
from streams.records import ConceptSet, Verdict
from streams.topics import CONCEPTS, VERDICTS
from workers.stage import Emit, Stage


class SamplerStage(Stage[Verdict]):
    name = "sampler"
    input = VERDICTS
    outputs = (CONCEPTS,)
    journaled = False  # new concept sets are roots, not children of the verdicts that free them

    def setup(self) -> None:
        from workers.concepts import ConceptSampler, load_pool

        self.sampler = ConceptSampler(
            load_pool(self.settings.concepts.pool_path), self.settings.concepts
        )
        self._domains = itertools.cycle(self.settings.sampler.domains)
        self._open: set[str] = set()
        self._issued = 0
        self._lock = threading.Lock()

    @property
    def issued(self) -> int:
        return getattr(self, "_issued", 0)

    def _issue(self, n: int) -> list[Emit]:
        cap = self.settings.sampler.max_issued
        emits = []
        with self._lock:
            for _ in range(n):
                if cap is not None and self._issued >= cap:
                    break
                concept_set: ConceptSet = self.sampler.sample(next(self._domains))
                self._open.add(concept_set.id)
                self._issued += 1
                emits.append(self.emit(CONCEPTS, concept_set))
            metrics.IN_FLIGHT.set(len(self._open))
        return emits

    def start(self) -> list[Emit]:
        return self._issue(self.settings.sampler.max_in_flight)

    def process(self, records: list[Verdict]) -> list[Emit]:
        closed = 0
        with self._lock:
            for verdict in records:
                root = verdict.lineage.concept_set_id
                if root in self._open:
                    self._open.discard(root)
                    closed += 1
        return self._issue(closed)
