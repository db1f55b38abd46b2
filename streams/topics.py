"""The one topic catalogue: every topic's name, record type, key and partition count.

Names live under a configurable namespace prefix so several factories can share a cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from streams.records import (
    AnnotatedSeed,
    CandidateProblem,
    ConceptSet,
    DeadLetter,
    DeadLetterReplay,
    ModelUpdate,
    PreferencePair,
    Problem,
    Rationale,
    Record,
    SeedProblem,
    SolverTrace,
    Verdict,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str  # short name, without the namespace
    record: type[Record]
    key: str  # record field used as the Kafka key
    partitions: int | None = None  # None: the cluster-wide default from settings
    doc: str = ""

    def full_name(self, namespace: str) -> str:
        return f"{namespace}.{self.name}" if namespace else self.name


SEEDS = TopicSpec("seeds", SeedProblem, "id", doc="seed problems to annotate")
SEEDS_ANNOTATED = TopicSpec(
    "seeds.annotated", AnnotatedSeed, "id", doc="seeds with concepts and a rationale"
)
CONCEPTS = TopicSpec("concepts", ConceptSet, "id", doc="concept sets for p_θ")
# One partition: the filter worker that owns it makes every near-duplicate decision (concurrent
# LanceDB check-then-insert lets duplicates through); the consumer group gives fail-over.
CANDIDATES = TopicSpec(
    "candidates", CandidateProblem, "id", partitions=1, doc="problems written by p_θ"
)
CANDIDATES_UNIQUE = TopicSpec(
    "candidates.unique", CandidateProblem, "id", doc="candidates that passed dedup/decontam"
)
VERDICTS = TopicSpec("verdicts", Verdict, "subject_id", doc="accepted/rejected, with reasons")
PROBLEMS = TopicSpec("problems", Problem, "id", doc="verified problems: the product")
PAIRS = TopicSpec("pairs", PreferencePair, "problem_id", doc="preference pairs for DPO")
TRACES = TopicSpec(
    "traces", SolverTrace, "problem_id", doc="verified solutions of accepted problems, for SFT"
)
RATIONALES = TopicSpec("rationales", Rationale, "seed_id", doc="q_φ samples with rewards")
MODELS = TopicSpec("models", ModelUpdate, "role", partitions=1, doc="new checkpoints")
DEAD_LETTERS = TopicSpec("deadletter", DeadLetter, "source_topic", doc="unreadable records")
DEAD_LETTER_REPLAYS = TopicSpec(
    "deadletter.replays",
    DeadLetterReplay,
    "source_topic",
    partitions=1,
    doc="dead letters replayed to their source topic",
)

CATALOGUE: dict[str, TopicSpec] = {
    t.name: t
    for t in (
        SEEDS,
        SEEDS_ANNOTATED,
        CONCEPTS,
        CANDIDATES,
        CANDIDATES_UNIQUE,
        VERDICTS,
        PROBLEMS,
        PAIRS,
        TRACES,
        RATIONALES,
        MODELS,
        DEAD_LETTERS,
        DEAD_LETTER_REPLAYS,
    )
}


def ensure_topics(
    admin_config: dict, namespace: str, partitions: int, replication: int
) -> list[str]:
    """Create every catalogue topic that does not exist yet; returns the names created.

    Idempotent: existing topics are left alone (TopicAlreadyExists is not an error).
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**admin_config)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(
                name=spec.full_name(namespace),
                num_partitions=spec.partitions or partitions,
                replication_factor=replication,
            )
            for spec in CATALOGUE.values()
            if spec.full_name(namespace) not in existing
        ]
        created = []
        for topic in wanted:  # one at a time: a race with another worker must not fail the rest
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics: %s", ", ".join(created))
        return created
    finally:
        admin.close()
