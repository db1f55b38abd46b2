"""What a stage is: a small declared class with an input topic, output topics, record types and
one pure ``process`` method. The Faust agent around it (workers/agent.py) is thin: it decodes
the input topic's record type, so ``process`` receives typed records, and every stage is tested
without Kafka by calling ``process`` directly.

``ModelStage`` adds what every model-using stage shares: which roles it uses, the backend
lookup (per call, so a reload takes effect at once; or backends handed in by a test), the
preload in ``setup`` and the generate call that counts tokens.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from llm.backends.base import Backend, Completion
from llm.roles import Role, backend_for
from streams import metrics
from streams.records import Record, Verdict
from streams.topics import VERDICTS, TopicSpec

if TYPE_CHECKING:  # the root settings compose every layer's sections; stages only read them
    from promptcot.settings import Settings

In = TypeVar("In", bound=Record)


@dataclass(frozen=True)
class Emit:
    """One record for one output topic."""

    topic: TopicSpec
    record: Record


class Stage(ABC, Generic[In]):
    name: ClassVar[str]
    input: ClassVar[TopicSpec]
    outputs: ClassVar[tuple[TopicSpec, ...]]
    # The runtime records the outputs of every input id and answers a redelivery with them
    # (workers/journal.py). Off for stages whose outputs are not children of one input.
    journaled: ClassVar[bool] = True
    # A batch that raises is retried record by record, so one poison record cannot take its
    # batch-mates with it. Off where the batch is one unit (a training window).
    isolate_failures: ClassVar[bool] = True

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

    def chunk_size(self, batch_size: int) -> int:
        """Records handed to one ``process`` call. Default: the whole micro-batch."""
        return batch_size

    def concurrent(self) -> bool:
        """May ``process`` run in several threads at once? Default: no. One call at a time keeps
        stateful stages simple (the filter's single-owner decisions, the sink's files); the
        runtime still overlaps one chunk's processing with the sending of earlier chunks."""
        return False

    def default_in_flight(self, batch_size: int) -> int:
        """Records between input and acknowledged output when settings don't say. Default: four
        micro-batches, so sends and broker acknowledgements overlap the next batch's work."""
        return 4 * batch_size

    @abstractmethod
    def process(self, records: list[In]) -> list[Emit]:
        """Turn one micro-batch of input records into output records. Must not raise for a bad
        record: a bad model output becomes a rejected verdict with a reason."""

    # Helpers shared by stages -------------------------------------------------------------------

    def emit(self, topic: TopicSpec, record: Record) -> Emit:
        if topic not in self.outputs:
            raise ValueError(f"stage {self.name} does not declare output {topic.name}")
        return Emit(topic, record)

    def reject(self, subject: Record, reason: str, detail: str = "", **fields: Any) -> Emit:
        """A rejected verdict for ``subject`` (a seed, concept set or candidate), with lineage
        that includes the ``models`` and ``templates`` that judged it (``Verdict.on`` takes
        them, and the verdict's other ``fields``)."""
        verdict = Verdict.on(subject, stage=self.name, reason=reason, detail=detail, **fields)
        metrics.REJECTED.labels(stage=self.name, reason=reason).inc()
        return self.emit(VERDICTS, verdict)


class ModelStage(Stage[In]):
    """A stage that calls models. ``roles`` names the ones it uses; ``backends`` (role ->
    backend) replaces the process-wide lookup, e.g. a scripted backend in a unit test."""

    roles: ClassVar[tuple[Role, ...]]

    def __init__(self, settings: Settings, backends: Mapping[str, Backend] | None = None):
        super().__init__(settings)
        self._backends = dict(backends or {})

    def backend(self, role: Role) -> Backend:
        if role in self._backends:
            return self._backends[role]
        return backend_for(self.settings.models, role)

    def reject(
        self,
        subject: Record,
        reason: str,
        detail: str = "",
        *,
        models: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Emit:
        """A rejection names the model versions that judged it, like every other output."""
        return super().reject(
            subject,
            reason,
            detail,
            models=self.model_versions() if models is None else models,
            **kwargs,
        )

    def model_versions(self, *roles: Role) -> dict[str, str]:
        """role -> served model version, for lineage."""
        return {str(role): self.backend(role).model_version for role in roles or self.roles}

    def setup(self) -> None:
        for role in self.roles:  # load the models before the first batch
            self.backend(role)

    def _continuous(self) -> bool:
        return all(getattr(self.backend(r), "continuous_batching", False) for r in self.roles)

    def chunk_size(self, batch_size: int) -> int:
        """A server that batches concurrent calls gets records one by one, so each moves on as
        soon as its own completion is back; the in-process model gets whole micro-batches."""
        return 1 if self._continuous() else batch_size

    def concurrent(self) -> bool:
        return self._continuous()

    def default_in_flight(self, batch_size: int) -> int:
        """As many records as the backends want in flight (a continuous-batching server's
        concurrency); for an in-process model, the default pipeline of micro-batches."""
        if not self._continuous():
            return super().default_in_flight(batch_size)
        return min(int(getattr(self.backend(r), "max_in_flight", batch_size)) for r in self.roles)

    def generate(self, role: Role, prompts: list[str], **sampling: Any) -> list[list[Completion]]:
        """``backend(role).generate`` that counts the role's tokens; no prompts, no call."""
        if not prompts:
            return []
        out = self.backend(role).generate(prompts, **sampling)
        self.count_tokens(role, (c for completions in out for c in completions))
        return out

    def generate_one(self, role: Role, prompts: list[str], **sampling: Any) -> list[Completion]:
        """One completion per prompt."""
        return [c[0] for c in self.generate(role, prompts, n=1, **sampling)]

    @staticmethod
    def count_tokens(role: str, completions: Iterable[Completion]) -> None:
        """Prompt and completion tokens of one model call, for the per-role token counters."""
        completions = list(completions)
        metrics.MODEL_TOKENS.labels(role=str(role), kind="prompt").inc(
            sum(c.n_prompt_tokens for c in completions)
        )
        metrics.MODEL_TOKENS.labels(role=str(role), kind="completion").inc(
            sum(c.n_completion_tokens for c in completions)
        )
