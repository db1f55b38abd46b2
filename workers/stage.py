"""What a stage is: a small declared class with an input topic, output topics, record types and
one pure ``process`` method. The Faust agent around it (workers/runtime.py) is thin, so every
stage is tested without Kafka by calling ``process`` directly.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from streams import metrics
from streams.records import Record, Verdict
from streams.settings import Settings
from streams.topics import VERDICTS, TopicSpec
from workers.backends.base import Completion


@dataclass(frozen=True)
class Emit:
    """One record for one output topic."""

    topic: TopicSpec
    record: Record


class Stage(ABC):
    name: ClassVar[str]
    input: ClassVar[TopicSpec]
    outputs: ClassVar[tuple[TopicSpec, ...]]

    def __init__(self, settings: Settings):
        self.settings = settings
        self._ready = False
        self._setup_lock = threading.Lock()  # a source primes while its first batch may arrive

    @property
    def input_type(self) -> type[Record]:
        return self.input.record

    def ensure_ready(self) -> None:
        """Heavy set-up (models, stores) on first use, inside the worker thread."""
        with self._setup_lock:
            if not self._ready:
                self.setup()
                self._ready = True

    def setup(self) -> None:
        """Load models, open stores. Default: nothing."""

    def close(self) -> None:
        """Release resources. Default: nothing."""

    def start(self) -> list[Emit]:
        """Records to emit when the worker starts (sources use it to prime the pipeline)."""
        return []

    @abstractmethod
    def process(self, records: list[Record]) -> list[Emit]:
        """Turn one micro-batch of input records into output records. Must not raise for a bad
        record: a bad model output becomes a rejected verdict with a reason."""

    # Helpers shared by stages -------------------------------------------------------------------

    def emit(self, topic: TopicSpec, record: Record) -> Emit:
        if topic not in self.outputs:
            raise ValueError(f"stage {self.name} does not declare output {topic.name}")
        return Emit(topic, record)

    def reject(
        self,
        subject: Record,
        reason: str,
        detail: str = "",
        *,
        models: dict[str, str] | None = None,
        templates: dict[str, str] | None = None,
        **fields: object,
    ) -> Emit:
        """A rejected verdict for ``subject`` (a seed, concept set or candidate), with lineage
        that includes the models and templates that judged it."""
        verdict = Verdict(
            subject_id=subject.id,
            stage=self.name,
            accepted=False,
            reason=reason,
            detail=detail[:2000],
            domain=getattr(subject, "domain", "math"),
            difficulty=getattr(subject, "difficulty", "") or "",
            concepts=list(getattr(subject, "concepts", []) or []),
            problem=getattr(subject, "problem", "") or "",
            parent_ids=[subject.id],
            lineage=subject.lineage.extend(subject.id, models=models, templates=templates),
            **fields,
        )
        metrics.REJECTED.labels(stage=self.name, reason=reason).inc()
        return self.emit(VERDICTS, verdict)

    def count_tokens(self, role: str, completions: Iterable[Completion]) -> None:
        """Prompt and completion tokens of one model call, for the per-role token counters."""
        completions = list(completions)
        metrics.MODEL_TOKENS.labels(role=role, kind="prompt").inc(
            sum(c.n_prompt_tokens for c in completions))
        metrics.MODEL_TOKENS.labels(role=role, kind="completion").inc(
            sum(c.n_completion_tokens for c in completions))
