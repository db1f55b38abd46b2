"""Records: stable content ids, lineage, headers, schema-version and strict validation."""

import json

import pytest
from pydantic import ValidationError

from streams import serde
from streams.records import (
    RECORD_TYPES,
    CandidateProblem,
    ConceptSet,
    DeadLetter,
    Verdict,
    content_hash,
)


def _concepts(**kw):
    base = dict(domain="math", concepts=["ratios", "percentages"], difficulty="AMC12", draw="0:1")
    return ConceptSet(**{**base, **kw})


def test_id_is_a_content_hash_of_the_defining_fields():
    a, b = _concepts(), _concepts()
    assert a.id == b.id and a.id.startswith("cset_")
    assert _concepts(draw="0:2").id != a.id
    assert _concepts(concepts=["percentages", "ratios"]).id != a.id  # order is meaningful


def test_content_hash_ignores_key_order():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})


def test_concept_set_is_the_root_of_its_lineage_and_children_extend_it():
    cs = _concepts()
    assert cs.lineage.concept_set_id == cs.id
    cand = CandidateProblem(
        concept_set_id=cs.id,
        domain="math",
        difficulty="AMC12",
        concepts=cs.concepts,
        rationale="combine",
        problem="What is 2+2?",
        parent_ids=[cs.id],
        lineage=cs.lineage.extend(
            cs.id, models={"prompt_model": "tiny@abc"}, templates={"synth": "h1"}
        ),
    )
    verdict = Verdict(
        subject_id=cand.id,
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        parent_ids=[cand.id],
        lineage=cand.lineage.extend(cand.id, models={"solver": "tiny@abc"}),
    )
    assert verdict.lineage.concept_set_id == cs.id
    assert verdict.lineage.ancestors == [cs.id, cand.id]
    assert verdict.lineage.models == {"prompt_model": "tiny@abc", "solver": "tiny@abc"}
    headers = verdict.headers()
    assert headers["x-concept-set-id"] == cs.id.encode()
    assert json.loads(headers["x-models"]) == verdict.lineage.models
    assert headers["x-parent-ids"] == cand.id.encode()


def test_round_trip_through_json_keeps_the_id():
    cs = _concepts()
    back = serde.decode(serde.encode(cs), ConceptSet)
    assert back == cs


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xff\xfe\x00garbage", serde.UNDECODABLE),
        (b"{not json", serde.UNDECODABLE),
        (b"[1, 2]", serde.SCHEMA_INVALID),
        (b'{"domain": "physics", "concepts": [], "difficulty": "x"}', serde.SCHEMA_INVALID),
        (
            b'{"domain": "math", "concepts": ["a"], "difficulty": "x", "surprise": 1}',
            serde.SCHEMA_INVALID,
        ),
        (None, serde.UNDECODABLE),
    ],
)
def test_bad_bytes_raise_a_decode_error_with_a_reason(payload, reason):
    with pytest.raises(serde.RecordDecodeError) as info:
        serde.decode(payload, ConceptSet)
    assert info.value.reason == reason


def test_dead_letter_keeps_the_raw_payload_and_origin():
    import base64

    err = serde.RecordDecodeError(serde.UNDECODABLE, "boom")
    dl = serde.dead_letter(
        stage="generate",
        error=err,
        topic="promptcot.concepts",
        partition=1,
        offset=42,
        key=b"k",
        payload=b"\xff raw",
    )
    assert isinstance(dl, DeadLetter)
    assert base64.b64decode(dl.payload_b64) == b"\xff raw"
    assert (dl.source_topic, dl.partition, dl.offset, dl.reason) == (
        "promptcot.concepts",
        1,
        42,
        "undecodable",
    )


def test_a_future_schema_version_is_refused_not_read_as_today():
    future = _concepts().model_dump(mode="json") | {"schema_version": 99}
    with pytest.raises(serde.RecordDecodeError) as info:
        serde.decode(json.dumps(future).encode(), ConceptSet)
    assert info.value.reason == serde.SCHEMA_VERSION_UNSUPPORTED
    assert "99" in info.value.error
    current = _concepts().model_dump(mode="json")
    assert serde.decode(json.dumps(current).encode(), ConceptSet).id == _concepts().id


def test_a_record_over_the_size_limit_is_refused_before_parsing():
    big = json.dumps(_concepts(draw="x" * 5000).model_dump(mode="json")).encode()
    with pytest.raises(serde.RecordDecodeError) as info:
        serde.decode(big, ConceptSet, max_bytes=4096)
    assert info.value.reason == serde.RECORD_TOO_LARGE
    assert serde.decode(big, ConceptSet, max_bytes=len(big)).draw == "x" * 5000


def test_a_dead_letter_fits_the_limit_whatever_the_payload():
    import base64

    payload = b"\xff" * 2_000_000
    dl = serde.dead_letter(
        stage="generate",
        error=serde.RecordDecodeError(serde.UNDECODABLE, "boom"),
        topic="promptcot.concepts",
        partition=0,
        offset=7,
        key=b"k",
        payload=payload,
        max_bytes=100_000,
    )
    assert len(serde.encode(dl)) <= 100_000
    assert dl.payload_size == 2_000_000 and dl.payload_truncated
    assert payload.startswith(base64.b64decode(dl.payload_b64))
    small = serde.dead_letter(
        stage="generate",
        error=ValueError("x"),
        topic="t",
        partition=0,
        offset=8,
        key=None,
        payload=b"abc",
        max_bytes=100_000,
    )
    assert base64.b64decode(small.payload_b64) == b"abc" and not small.payload_truncated
    assert small.reason == serde.PROCESSING_ERROR


def test_a_dead_letter_of_an_error_quoting_model_text_is_encodable():
    """An error message may quote model text holding a lone surrogate; the dead letter that
    carries it must still encode, or the input could never leave its partition."""
    dl = serde.dead_letter(
        stage="verify",
        error=ValueError("cannot parse 'x\ud800y'"),
        topic="t",
        partition=0,
        offset=1,
        key=None,
        payload=b"{}",
    )
    assert "x\ufffdy" in json.loads(serde.encode(dl))["error"]
    assert serde.valid_text("a\udcff\ud800b") == ("a\ufffd\ufffdb", 2)
    assert serde.valid_text("plain é") == ("plain é", 0)


def test_every_record_type_has_a_json_schema_and_a_unique_kind():
    assert len({cls.id_prefix for cls in RECORD_TYPES.values()}) == len(RECORD_TYPES)
    for cls in RECORD_TYPES.values():
        schema = cls.model_json_schema()
        assert "id" in schema["properties"] and "lineage" in schema["properties"]


def test_unknown_fields_are_rejected_not_silently_dropped():
    with pytest.raises(ValidationError):
        Verdict(subject_id="x", stage="s", accepted=True, reason="accepted", domain="math", bogus=1)


def test_every_topic_is_keyed_by_a_field_of_its_record_type():
    """A key naming no field silently falls back to the record id (workers/pipeline.py)."""
    from streams.topics import CATALOGUE

    for spec in CATALOGUE.values():
        assert spec.key in spec.record.model_fields, (spec.name, spec.key)


def _trace(**kw):
    from streams.records import SolverTrace

    base = dict(
        problem_id="cand_1",
        source="solver",
        index=2,
        domain="math",
        prompt="Solve the problem.\n\nProblem:\nWhat is 2+2?",
        completion="2+2 = 4, so \\boxed{4}",
        reference_answer="4",
    )
    return SolverTrace(**{**base, **kw})


def test_a_solver_trace_is_identified_by_problem_source_and_index_not_by_its_text():
    """A redelivered verdict re-emits its traces under the same ids, whatever was re-sampled."""
    a = _trace()
    assert a.id.startswith("trace_")
    assert _trace(completion="other words, \\boxed{4}").id == a.id
    assert _trace(index=3).id != a.id
    assert _trace(source="teacher").id != a.id
    assert _trace(problem_id="cand_2").id != a.id
    with pytest.raises(ValidationError):
        _trace(source="crowd")  # only the solver's rollouts and a teacher write traces
    back = serde.decode(serde.encode(a), type(a))
    assert back == a and RECORD_TYPES["solver_trace"] is type(a)


def test_the_traces_topic_carries_solver_traces_keyed_by_problem():
    from streams.records import SolverTrace
    from streams.topics import CATALOGUE, TRACES

    assert CATALOGUE["traces"] is TRACES
    assert TRACES.record is SolverTrace and TRACES.key == "problem_id"


def test_a_verdict_without_a_reference_source_serializes_as_before_the_field_existed():
    """A reader of an earlier release (strict: unknown fields are refused) still reads every
    verdict that has no reference source and no teacher rollouts."""
    from streams.records import Rollout

    plain = Verdict(subject_id="x", stage="verify", accepted=False, reason="r", domain="code")
    assert not {"reference_source", "teacher_rollouts"} & set(json.loads(serde.encode(plain)))
    sourced = plain.model_copy(
        update={"reference_source": "teacher", "teacher_rollouts": [Rollout(text="t")]}
    )
    back = serde.decode(serde.encode(sourced), Verdict)
    assert back.reference_source == "teacher" and back.teacher_rollouts == [Rollout(text="t")]
    assert back.id == plain.id  # the id names the subject and the stage, as before
