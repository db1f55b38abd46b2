"""The whole factory through the real embedded broker, with the tiny model in every role.

One run feeds concept sets (math and code), seed problems and garbage on every input topic, then
checks: every concept set reaches exactly one verdict; accepted problems reach the problems topic
and the Parquet sink with full lineage (in the record and in Kafka headers); every unreadable
record is in the dead-letter topic with its reason, origin and raw bytes, and the valid records
after it were still processed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict

import pytest
from factory_harness import factory_settings, read_records, wait_until

from promptcot.registry import DATA_STAGES
from promptcot.startup import make_stage
from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import ConceptSet, DeadLetter, Problem, Verdict
from streams.topics import CATALOGUE, SEEDS, ensure_topics
from workers.runtime import run_stages
from workers.seeds import load_seeds
from workers.stages.sink import read_problems

pytestmark = pytest.mark.slow

N_SETS = 6
GARBAGE = [b"\xff\xfe\x00 not json", b'{"schema_version": 1, "unexpected": true}']


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as b:
        yield b


def _raw_send(settings, topic: str, payloads: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(
        **kafka_python_config(settings.kafka, settings.kafka.bootstrap_servers)
    )
    for payload in payloads:
        producer.send(topic, payload, key=b"garbage")
    producer.flush()
    producer.close()


def test_factory_end_to_end_with_dead_letters(broker, tmp_path, tiny_model_dir):
    settings = factory_settings(
        tmp_path,
        broker.bootstrap_servers,
        tiny_model_dir,
        sampler={"max_in_flight": 3, "max_issued": N_SETS, "domains": ["math", "code"]},
        # The tiny model answers at random and its rationales state no answer: widen the band
        # and take the opt-in self-agreement reference, so that some problems pass and the
        # product path is exercised (the reference rules are unit-tested in
        # test_stages_scripted.py, the band in test_stages.py).
        verify={"max_pass_rate": 1.0, "math": {"reference": "majority", "min_agreement": 0.25}},
    )
    ns = settings.kafka.namespace
    ensure_topics(kafka_python_config(settings.kafka, broker.bootstrap_servers), ns, 2, 1)
    input_topics = sorted({make_stage(n, settings).input.name for n in DATA_STAGES})
    for name in input_topics:  # garbage first: the valid records behind it must still flow
        _raw_send(settings, CATALOGUE[name].full_name(ns), GARBAGE)
    seeds = load_seeds("gsm8k", "train", limit=2)
    publish(settings.kafka, broker.bootstrap_servers, SEEDS, seeds)

    def seed_fates() -> dict[str, str]:
        """seed id -> "rationales" | "rejected:<stage>" for seeds that finished."""
        rejected = {r.subject_id: r.stage for r, _ in read_records(settings, "verdicts") if r}
        annotated = {r.seed_id: r.id for r, _ in read_records(settings, "seeds.annotated") if r}
        scored = {r.seed_id for r, _ in read_records(settings, "rationales") if r}
        fates = {}
        for seed in seeds:
            if seed.id in rejected:
                fates[seed.id] = f"rejected:{rejected[seed.id]}"
            elif seed.id in scored:
                fates[seed.id] = "rationales"
            elif annotated.get(seed.id) in rejected:
                fates[seed.id] = f"rejected:{rejected[annotated[seed.id]]}"
        return fates

    def done() -> bool:
        concept_ids = {r.id for r, _ in read_records(settings, "concepts") if r}
        judged = {r.lineage.concept_set_id for r, _ in read_records(settings, "verdicts") if r}
        print(
            f"progress: {len(concept_ids)} sets, {len(concept_ids & judged)} judged, seeds "
            f"{seed_fates()}",
            flush=True,
        )
        return (
            len(concept_ids) == N_SETS and concept_ids <= judged and len(seed_fates()) == len(seeds)
        )

    async def until() -> None:
        await wait_until(done, timeout_s=420)
        await asyncio.sleep(2)  # let sink/pairs drain the last verdicts

    asyncio.run(
        run_stages(
            settings,
            [make_stage(n, settings) for n in DATA_STAGES],
            broker.bootstrap_servers,
            app_id=f"{ns}-factory",
            until=until,
        )
    )

    # Every concept set: exactly one verdict (ids dedupe at-least-once repeats).
    concept_sets = [r for r, _ in read_records(settings, "concepts") if isinstance(r, ConceptSet)]
    assert len({c.id for c in concept_sets}) == N_SETS
    assert {c.domain for c in concept_sets} == {"math", "code"}
    verdicts_by_set: dict[str, set[str]] = defaultdict(set)
    verdicts: dict[str, Verdict] = {}
    for r, _ in read_records(settings, "verdicts"):
        if isinstance(r, Verdict) and r.lineage.concept_set_id in {c.id for c in concept_sets}:
            verdicts_by_set[r.lineage.concept_set_id].add(r.id)
            verdicts[r.id] = r
    assert {c.id: len(verdicts_by_set[c.id]) for c in concept_sets} == {
        c.id: 1 for c in concept_sets
    }
    for v in verdicts.values():
        assert v.reason and (v.accepted == (v.reason == "accepted")), v

    # Accepted problems reach the problems topic and the sink, with full lineage.
    accepted = {v.subject_id: v for v in verdicts.values() if v.accepted}
    problems = {}
    for r, message in read_records(settings, "problems"):
        assert isinstance(r, Problem)
        problems[r.candidate_id] = (r, dict(message.headers))
    assert set(problems) == set(accepted)
    for candidate_id, (problem, headers) in problems.items():
        lineage = problem.lineage
        assert lineage.concept_set_id in {c.id for c in concept_sets}
        assert lineage.ancestors[0] == lineage.concept_set_id and candidate_id in lineage.ancestors
        assert {"prompt_model", "solver"} <= set(lineage.models)
        assert "synthesis" in lineage.templates
        assert headers["x-concept-set-id"] == lineage.concept_set_id.encode()
        assert json.loads(headers["x-models"]) == lineage.models
    assert {row["candidate_id"] for row in read_problems(tmp_path / "out" / "problems")} == set(
        accepted
    )

    # Every seed was annotated and scored by q_φ/p_θ, or rejected by a stage with a reason.
    assert set(seed_fates()) == {s.id for s in seeds}
    for r, _ in read_records(settings, "rationales"):
        assert r.reward == pytest.approx(r.logp_problem + r.logp_rationale) and r.reward < 0
        assert r.lineage.models["rationale_model"] and r.lineage.models["prompt_model"]

    # Dead letters: both garbage payloads of every input topic, with reason, origin, raw bytes.
    dead = [r for r, _ in read_records(settings, "deadletter") if isinstance(r, DeadLetter)]
    by_topic: dict[str, set[bytes]] = defaultdict(set)
    for d in dead:
        assert d.reason in ("undecodable", "schema_invalid") and d.error and d.offset >= 0
        by_topic[d.source_topic].add(base64.b64decode(d.payload_b64))
    for name in input_topics:
        assert by_topic[CATALOGUE[name].full_name(ns)] == set(GARBAGE), name
