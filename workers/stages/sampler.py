"""The concept-set source. It keeps ``max_in_flight`` concept sets open: it primes the pipeline at
start and issues one new set for every verdict that closes one of its own, so a slow verifier
slows the sampler instead of growing an unbounded backlog.

A restarted sampler continues where it stopped: its position (next draw, sets issued, sets still
open) comes from the topics (workers/sampler_position.py), it tops the open window up to
``max_in_flight`` and never issues a draw twice. Draw k is a pure function of (pool, settings,
seed, k), domain included, so a draw issued but never acknowledged is issued again with the
same id. Replicas run with distinct ``concepts.seed`` and each reads every verdict (its own
consumer group, see `promptcot worker`): each closes only its own sets.
"""

from __future__ import annotations

import logging
import threading

from streams import metrics
from streams.records import ConceptSet, Verdict
from streams.topics import CONCEPTS, VERDICTS
from workers.sampler_position import SamplerPosition, restore_position
from workers.settings import SEED_LEVELS
from workers.stage import Emit, Stage

log = logging.getLogger(__name__)


def unseen_levels(ladders: dict[str, list[str]], domains: list[str]) -> list[str]:
    """Levels the sampler would ask p_θ for that no shipped seed carries, so no training prompt
    of p_θ ever named them (workers/settings.py, SEED_LEVELS)."""
    known = set(SEED_LEVELS.values())
    return [level for d in domains for level in ladders.get(d, []) if level not in known]


class SamplerStage(Stage[Verdict]):
    name = "sampler"
    input = VERDICTS
    outputs = (CONCEPTS,)
    journaled = False  # new concept sets are roots, not children of the verdicts that free them

    def setup(self) -> None:
        from workers.concepts import ConceptSampler, load_pool

        kafka = self.settings.kafka
        # No cluster to read (a unit test calling process directly): a fresh start.
        self.restored = (
            restore_position(kafka, kafka.bootstrap_servers, self.settings.concepts.seed)
            if kafka.bootstrap_servers
            else SamplerPosition()
        )
        self.sampler = ConceptSampler(
            load_pool(self.settings.concepts.pool_path),
            self.settings.concepts,
            first_draw=self.restored.next_draw,
        )
        unseen = unseen_levels(
            self.settings.concepts.difficulty_ladders, self.settings.sampler.domains
        )
        if unseen:
            log.warning(
                "the sampler asks p_θ for levels no training seed carries (%s): they mean "
                "something only after a cold start on seeds annotated with them",
                ", ".join(unseen),
            )
        self._open: set[str] = set(self.restored.open)
        self._issued = self.restored.issued
        self._lock = threading.Lock()

    @property
    def issued(self) -> int:
        return getattr(self, "_issued", 0)

    def _issue(self, n: int) -> list[Emit]:
        cap = self.settings.sampler.max_issued
        domains = self.settings.sampler.domains
        emits = []
        with self._lock:
            for _ in range(n):
                if cap is not None and self._issued >= cap:
                    break
                domain = domains[self.sampler.draws % len(domains)]
                concept_set: ConceptSet = self.sampler.sample(domain)
                self._open.add(concept_set.id)
                self._issued += 1
                emits.append(self.emit(CONCEPTS, concept_set))
            metrics.IN_FLIGHT.set(len(self._open))
        return emits

    def start(self) -> list[Emit]:
        """Top the open window up to max_in_flight (all of it on a first start)."""
        return self._issue(self.settings.sampler.max_in_flight - len(self._open))

    def process(self, records: list[Verdict]) -> list[Emit]:
        closed = 0
        with self._lock:
            for verdict in records:
                root = verdict.lineage.concept_set_id
                if root in self._open:
                    self._open.discard(root)
                    closed += 1
        return self._issue(closed)
