"""Typed records carried by every topic.

Every record has a stable ``id``: a content hash of the fields that define it. For model outputs
those fields name the unit of work (which input, which model, which sample), not the sampled
text, so a redelivered input that is processed again yields the same ids even though sampling
is not reproducible across batch compositions; consumers keep the first record of each id.
Lineage (parent ids, model versions, prompt-template hashes) accumulates from the concept set to
the verdict; it travels in the record and, for consumers that only read headers, in Kafka headers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

SCHEMA_VERSION = 1
MAX_DETAIL_CHARS = 2000  # Verdict.detail is cut to this

Domain = Literal["math", "code"]


def content_hash(payload: Any, length: int = 20) -> str:
    """sha256 of canonical JSON: key order and whitespace never change an id."""
    blob = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


class Judgment(BaseModel):
    """A judge's verdict on a record against another item, e.g. the filter's decontamination
    judge on a candidate and a benchmark problem it resembles."""

    model_config = ConfigDict(extra="forbid")

    stage: str  # which stage asked
    other_id: str  # what the record was compared with, e.g. "aime24:12"
    similarity: float  # cosine of the two
    same: bool  # the judge's verdict: the same problem
    judge: str  # "skeleton@v1" or the judge model's version
    template: str = ""  # the model judge's prompt template id
    detail: str = ""  # why, briefly
    malformed: bool = False  # the model's answer was unreadable; the cheap signal decided


class Lineage(BaseModel):
    """Where a record came from: the concept set at the root, every ancestor id, which model
    versions and prompt templates touched it on the way, and what judges said about it."""

    model_config = ConfigDict(extra="forbid")

    concept_set_id: str | None = None
    ancestors: list[str] = Field(default_factory=list)
    models: dict[str, str] = Field(default_factory=dict)  # role -> model version
    templates: dict[str, str] = Field(default_factory=dict)  # template name -> hash
    judgments: list[Judgment] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_no_judgments(self, handler: Any) -> dict[str, Any]:
        """Without judgments the lineage serializes as before the field existed, so a reader of
        an earlier release still reads every record no judge touched."""
        data = handler(self)
        if not self.judgments:
            data.pop("judgments", None)
        return data

    def extend(
        self,
        parent_id: str,
        models: dict[str, str] | None = None,
        templates: dict[str, str] | None = None,
    ) -> Lineage:
        return Lineage(
            concept_set_id=self.concept_set_id,
            ancestors=[*self.ancestors, parent_id]
            if parent_id not in self.ancestors
            else self.ancestors,
            models={**self.models, **(models or {})},
            templates={**self.templates, **(templates or {})},
            judgments=list(self.judgments),
        )


class Record(BaseModel):
    """Base of every topic record. Subclasses name the fields that define their identity."""

    model_config = ConfigDict(extra="forbid")

    kind: ClassVar[str] = "record"
    id_prefix: ClassVar[str] = "rec"
    id_fields: ClassVar[tuple[str, ...]] = ()

    id: str = ""
    parent_ids: list[str] = Field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    created_at: float = Field(default_factory=time.time)
    lineage: Lineage = Field(default_factory=Lineage)

    @model_validator(mode="after")
    def _assign_id(self) -> Record:
        if not self.id:
            defining = {name: _plain(getattr(self, name)) for name in self.id_fields}
            self.id = f"{self.id_prefix}_{content_hash(defining)}"
        return self

    @classmethod
    def derived_from(
        cls,
        parent: Record,
        *,
        models: dict[str, str] | None = None,
        templates: dict[str, str] | None = None,
        **fields: Any,
    ) -> Self:
        """A child of ``parent``: its parent id, and the parent's lineage extended by the parent
        and by the models and prompt templates that made the child."""
        return cls(
            parent_ids=[parent.id],
            lineage=parent.lineage.extend(parent.id, models=models, templates=templates),
            **fields,
        )

    def headers(self) -> dict[str, bytes]:
        """Lineage in Kafka headers, so consumers can route or audit without parsing the body."""
        return {
            "x-record-kind": self.kind.encode(),
            "x-record-id": self.id.encode(),
            "x-schema-version": str(self.schema_version).encode(),
            "x-parent-ids": ",".join(self.parent_ids).encode(),
            "x-concept-set-id": (self.lineage.concept_set_id or "").encode(),
            "x-models": json.dumps(self.lineage.models, sort_keys=True).encode(),
            "x-templates": json.dumps(self.lineage.templates, sort_keys=True).encode(),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def problem_payload(
    domain: str, difficulty: str, concepts: list[str], problem: str
) -> dict[str, Any]:
    """The fields of ``ProblemPayload``, as keywords for the next record."""
    return {
        "domain": domain,
        "difficulty": difficulty,
        "concepts": list(concepts),
        "problem": problem,
    }


class ProblemPayload(BaseModel):
    """The problem a record carries from hop to hop (rationale; candidate -> verdict -> problem):
    the conditions c (domain, concepts, difficulty) and the problem text x. ``payload()`` is what
    the next record takes over unchanged. An annotated seed carries its problem in ``text`` (and
    no difficulty as None) until a schema version renames it: ``AnnotatedSeed.payload``."""

    model_config = ConfigDict(extra="forbid")

    domain: Domain
    difficulty: str
    concepts: list[str]
    problem: str

    def payload(self) -> dict[str, Any]:
        return problem_payload(self.domain, self.difficulty, self.concepts, self.problem)


# --- seeds and concepts -------------------------------------------------------------------------


class SeedProblem(Record):
    """A human-written problem from a seed corpus (GSM8K, Codeforces, ...)."""

    kind: ClassVar[str] = "seed"
    id_prefix: ClassVar[str] = "seed"
    id_fields: ClassVar[tuple[str, ...]] = ("source", "source_id", "text")

    source: str
    source_id: str
    domain: Domain
    text: str
    answer: str | None = None
    # The corpus's worked solution, when it has one (GSM8K): without a teacher model the cold
    # start derives the seed's rationale from it (workers/annotation.py).
    solution: str | None = None
    tests: list[dict[str, str]] = Field(default_factory=list)


class AnnotatedSeed(Record):
    """A seed with its foundational concepts and a reverse-engineered rationale (cold start data
    for both models and the E-step input). The EM loop revisits every seed once per epoch: the
    epoch is part of the unit of work, so each epoch's samples get ids of their own."""

    kind: ClassVar[str] = "annotated_seed"
    id_prefix: ClassVar[str] = "aseed"
    id_fields: ClassVar[tuple[str, ...]] = ("seed_id", "annotator", "epoch")

    seed_id: str
    annotator: str = ""  # model version of the annotator (or "lexicon+model")
    domain: Domain
    text: str
    concepts: list[str]
    rationale: str
    difficulty: str | None = None
    epoch: int = 0

    def payload(self) -> dict[str, Any]:
        """The seed's problem as the records after it carry it (``ProblemPayload``)."""
        return problem_payload(self.domain, self.difficulty or "", self.concepts, self.text)

    @staticmethod
    def carrying(payload: dict[str, Any]) -> dict[str, Any]:
        """The fields of a seed that carries ``payload`` (the inverse of ``payload``)."""
        return {
            "domain": payload["domain"],
            "text": payload["problem"],
            "concepts": list(payload["concepts"]),
            "difficulty": payload["difficulty"] or None,
        }


class ConceptSet(Record):
    """What p_θ is conditioned on: k concepts and a difficulty level."""

    kind: ClassVar[str] = "concept_set"
    id_prefix: ClassVar[str] = "cset"
    # The draw number keeps two identical draws distinct: each is its own unit of work.
    id_fields: ClassVar[tuple[str, ...]] = ("domain", "concepts", "difficulty", "draw")

    domain: Domain
    concepts: list[str]
    difficulty: str
    draw: str = ""

    @model_validator(mode="after")
    def _root_lineage(self) -> ConceptSet:
        if self.lineage.concept_set_id is None:
            self.lineage.concept_set_id = self.id
        return self

    def payload(self, problem: str = "") -> dict[str, Any]:
        """The payload of ``problem`` written for this concept set (none written yet: "")."""
        return problem_payload(self.domain, self.difficulty, self.concepts, problem)


class Rationale(ProblemPayload, Record):
    """One q_φ sample for a seed, with its reward under the current p_θ:
    R(z) = log p_θ(x | z, c) + log p_θ(z | c)."""

    kind: ClassVar[str] = "rationale"
    id_prefix: ClassVar[str] = "rat"
    id_fields: ClassVar[tuple[str, ...]] = (
        "seed_id",
        "epoch",
        "sample_index",
        "rationale_model",
        "prompt_model",
    )

    seed_id: str
    difficulty: str = ""  # the seed's, "" when it has none
    text: str
    sample_index: int
    reward: float
    logp_problem: float  # log p_θ(x | z, c)
    logp_rationale: float  # log p_θ(z | c)
    rationale_model: str
    prompt_model: str
    epoch: int = 0  # the seed's epoch (AnnotatedSeed.epoch)


# --- candidates and verification ----------------------------------------------------------------


class CandidateProblem(ProblemPayload, Record):
    kind: ClassVar[str] = "candidate"
    id_prefix: ClassVar[str] = "cand"
    id_fields: ClassVar[tuple[str, ...]] = ("concept_set_id", "generator")

    concept_set_id: str
    generator: str = ""  # model version of p_θ that wrote it
    rationale: str


class Rollout(BaseModel):
    """One solver attempt, summarized: enough to build preference pairs and audit the vote."""

    model_config = ConfigDict(extra="forbid")

    text: str
    answer: str | None = None  # math: extracted final answer
    passed: bool = False
    failure: str | None = None  # reason code when it did not pass
    n_tokens: int = 0


class TestCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str
    output: str


ACCEPTED = "accepted"  # Verdict.reason of an accepted problem


class Verdict(ProblemPayload, Record):
    """The fate of one candidate (or of a seed or concept set that yielded none)."""

    kind: ClassVar[str] = "verdict"
    id_prefix: ClassVar[str] = "verd"
    id_fields: ClassVar[tuple[str, ...]] = ("subject_id", "stage")

    subject_id: str  # the candidate id, or the concept set id when no candidate was produced
    stage: str  # which stage decided
    accepted: bool
    reason: str  # ACCEPTED or a rejection reason code
    detail: str = ""
    # A verdict on a seed or a concept set has no problem of the factory's to carry.
    difficulty: str = ""
    concepts: list[str] = Field(default_factory=list)
    problem: str = ""
    rationale: str = ""
    reference_answer: str | None = None
    # Where the math reference came from: "teacher", "designer" or "majority" (the solver's own
    # plurality: self-agreement); "" where no math reference was sought (code, earlier stages,
    # verdicts written before the field existed).
    reference_source: str = ""
    tests: list[TestCase] = Field(default_factory=list)
    pass_rate: float | None = None
    rollouts: list[Rollout] = Field(default_factory=list)
    teacher_rollouts: list[Rollout] = Field(default_factory=list)  # the teacher's, when it voted
    nearest_id: str | None = None
    similarity: float | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_reference(self, handler: Any) -> dict[str, Any]:
        """Without a reference source or teacher rollouts a verdict serializes as before those
        fields existed, so a reader of an earlier release still reads it."""
        data = handler(self)
        if not self.reference_source:
            data.pop("reference_source", None)
        if not self.teacher_rollouts:
            data.pop("teacher_rollouts", None)
        return data

    @classmethod
    def on(
        cls,
        subject: Record,
        *,
        stage: str,
        reason: str,
        detail: str = "",
        models: dict[str, str] | None = None,
        templates: dict[str, str] | None = None,
        **fields: Any,
    ) -> Verdict:
        """The verdict of ``stage`` on ``subject``: accepted when ``reason`` is ACCEPTED, else
        rejected with that reason code; ``models`` and ``templates`` (what judged it) join the
        lineage. It carries the subject's problem: the whole payload of a record that has one
        (a candidate), else what a seed or concept set has of it (domain, concepts,
        difficulty), no problem text."""
        if isinstance(subject, ProblemPayload):
            payload = subject.payload()
        else:
            payload = problem_payload(
                getattr(subject, "domain", "math"),
                getattr(subject, "difficulty", "") or "",
                getattr(subject, "concepts", []) or [],
                "",
            )
        return cls.derived_from(
            subject,
            models=models,
            templates=templates,
            subject_id=subject.id,
            stage=stage,
            accepted=reason == ACCEPTED,
            reason=reason,
            detail=detail[:MAX_DETAIL_CHARS],
            **payload,
            **fields,
        )


class Problem(ProblemPayload, Record):
    """The product: a verified problem, as downstream teams consume it."""

    kind: ClassVar[str] = "problem"
    id_prefix: ClassVar[str] = "prob"
    id_fields: ClassVar[tuple[str, ...]] = ("candidate_id",)

    candidate_id: str
    rationale: str
    reference_answer: str | None = None
    reference_source: str = ""  # Verdict.reference_source
    tests: list[TestCase] = Field(default_factory=list)
    pass_rate: float
    n_rollouts: int

    @model_serializer(mode="wrap")
    def _omit_unset_reference(self, handler: Any) -> dict[str, Any]:
        """Without a reference source a problem serializes as before the field existed."""
        data = handler(self)
        if not self.reference_source:
            data.pop("reference_source", None)
        return data


class PreferencePair(Record):
    """A DPO pair in the shape TRL's DPOTrainer reads (prompt / chosen / rejected)."""

    kind: ClassVar[str] = "pair"
    id_prefix: ClassVar[str] = "pair"
    id_fields: ClassVar[tuple[str, ...]] = ("problem_id", "pair_index")

    problem_id: str
    pair_index: int = 0
    domain: Domain
    prompt: str
    chosen: str
    rejected: str


TraceSource = Literal["solver", "teacher"]


class SolverTrace(Record):
    """A verified solution of an accepted problem, for supervised fine-tuning of the solver (the
    design's second post-training mode): a solver rollout that finished, stated a final answer
    and agrees with the reference, or a teacher's solution. ``prompt`` is the solver's user
    text, as preference pairs carry it (trainers render it with their model's chat template);
    ``completion`` is the solution the solver should learn to write."""

    kind: ClassVar[str] = "solver_trace"
    id_prefix: ClassVar[str] = "trace"
    id_fields: ClassVar[tuple[str, ...]] = ("problem_id", "source", "index")

    problem_id: str  # the accepted verdict's subject: the candidate id
    source: TraceSource
    index: int = 0  # which rollout of the verdict (solver), or which teacher trace
    domain: Domain
    prompt: str
    completion: str
    reference_answer: str | None = None  # math: the reference it agrees with
    n_tokens: int = 0  # completion tokens, as the model that wrote it counted them


def version_number(text: str) -> int | None:
    """The version number in a checkpoint folder name, path or version string
    (``<role>/v0007-<step>``)."""
    m = re.search(r"(?:^|/)v(\d{4,})-", str(text))
    return int(m.group(1)) if m else None


class ModelUpdate(Record):
    """Announces a new checkpoint; generators reload when they see one for their role."""

    kind: ClassVar[str] = "model_update"
    id_prefix: ClassVar[str] = "mupd"
    id_fields: ClassVar[tuple[str, ...]] = ("role", "version", "path")

    role: str
    version: str
    path: str
    step: str  # "cold_start" | "e_step" | "m_step" | "dpo" | "sft"
    metrics: dict[str, float] = Field(default_factory=dict)

    @property
    def number(self) -> int:
        """The version number (0 when the version string carries none)."""
        return version_number(self.version) or version_number(self.path) or 0


class DeadLetter(Record):
    """A record no stage could read, kept with the reason and where it came from."""

    kind: ClassVar[str] = "dead_letter"
    id_prefix: ClassVar[str] = "dlq"
    id_fields: ClassVar[tuple[str, ...]] = ("stage", "source_topic", "partition", "offset")

    stage: str
    reason: str
    error: str
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    payload_b64: str  # the raw bytes, base64, cut to fit the record size limit
    payload_size: int = 0  # bytes of the original payload
    payload_truncated: bool = False  # then the whole bytes are at the source coordinates


class DeadLetterReplay(Record):
    """A dead-lettered source record sent back to its topic (`promptcot dlq replay`). One per
    source record: the dead letters that several stages wrote for it are replayed once."""

    kind: ClassVar[str] = "dead_letter_replay"
    id_prefix: ClassVar[str] = "dlqr"
    id_fields: ClassVar[tuple[str, ...]] = ("source_topic", "partition", "offset")

    dead_letter_ids: list[str]
    reason: str  # the (first) dead letter's reason
    source_topic: str
    partition: int
    offset: int
    replayed_partition: int  # where the replayed copy landed
    replayed_offset: int
    bytes_from: Literal["dead_letter", "source_topic"]


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls
    for cls in (
        SeedProblem,
        AnnotatedSeed,
        ConceptSet,
        Rationale,
        CandidateProblem,
        Verdict,
        Problem,
        PreferencePair,
        SolverTrace,
        ModelUpdate,
        DeadLetter,
        DeadLetterReplay,
    )
}
