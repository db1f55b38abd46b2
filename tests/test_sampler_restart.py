"""A restarted sampler continues where it stopped (issue 10, item 4): its position comes from the
topics of the real broker, so it issues new draws only, tops its open window up, and a sampler
with another seed (a replica) never takes over the first one's draws."""

from __future__ import annotations

import pytest
from factory_harness import factory_settings

from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import Verdict
from streams.topics import CONCEPTS, VERDICTS, ensure_topics
from workers.stages.sampler import SamplerStage


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as b:
        yield b


def _sampler(settings) -> SamplerStage:
    stage = SamplerStage(settings)
    stage.ensure_ready()
    return stage


def _close(settings, concept_sets) -> None:
    publish(settings.kafka, settings.kafka.bootstrap_servers, VERDICTS, _verdicts(concept_sets))


def test_restarted_sampler_issues_new_draws_and_keeps_its_window(broker, tmp_path):
    settings = factory_settings(
        tmp_path,
        broker.bootstrap_servers,
        tmp_path,
        sampler={"max_in_flight": 4, "domains": ["math", "code"]},
    )
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)

    first = _sampler(settings)
    assert first.restored.issued == 0
    issued = [e.record for e in first.start()]
    assert [c.draw for c in issued] == ["0:0", "0:1", "0:2", "0:3"]
    # Closing two sets issues two more; then the sampler "dies" with draws 0..5 published.
    issued += [e.record for e in first.process(_verdicts(issued[:2]))]
    publish(kafka, broker.bootstrap_servers, CONCEPTS, issued)
    _close(settings, issued[:3])  # a third verdict arrived that the dead sampler never saw

    second = _sampler(settings)
    position = second.restored
    assert position.next_draw == 6 and position.issued == 6
    assert position.open == {c.id for c in issued[3:]}
    topped_up = [e.record for e in second.start()]
    assert [c.draw for c in topped_up] == ["0:6"]  # 3 open + 1 = max_in_flight
    assert not {c.id for c in topped_up} & {c.id for c in issued}
    # A verdict the second sampler's position already counted is not counted twice.
    assert second.process(_verdicts(issued[2:3])) == []
    # Draw k has the same domain whoever issues it: domains alternate by draw number.
    assert [c.domain for c in issued + topped_up] == ["math", "code"] * 3 + ["math"]

    # A replica with another seed owns none of these draws.
    other = _sampler(
        settings.model_copy(update={"concepts": settings.concepts.model_copy(update={"seed": 1})})
    )
    assert other.restored.issued == 0
    assert [c.draw for c in (e.record for e in other.start())][:1] == ["1:0"]
    assert other.process(_verdicts(issued[3:4])) == []  # not its set: nothing to replace


def test_max_issued_counts_the_draws_of_earlier_runs(broker, tmp_path):
    settings = factory_settings(
        tmp_path, broker.bootstrap_servers, tmp_path, sampler={"max_in_flight": 3, "max_issued": 4}
    )
    kafka = settings.kafka
    ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
    issued = [e.record for e in _sampler(settings).start()]
    publish(kafka, broker.bootstrap_servers, CONCEPTS, issued)
    _close(settings, issued)
    again = _sampler(settings).start()
    assert [e.record.draw for e in again] == ["0:3"]  # 3 earlier + 1 = max_issued


def _verdicts(concept_sets) -> list[Verdict]:
    return [
        Verdict.derived_from(
            cs, subject_id=cs.id, stage="verify", accepted=False, reason="x", domain=cs.domain
        )
        for cs in concept_sets
    ]
