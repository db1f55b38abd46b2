"""seeds -> seeds.annotated: the cold-start teacher names each seed's foundational concepts and
reverse-engineers the rationale that would lead a designer from them to exactly this problem.

Without a teacher (the embedded default) the triple is built from the seed itself, with no model:
lexicon concepts and a rationale derived from the seed's worked solution (workers/annotation.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm.backends.base import Completion
from llm.prompts import (
    CONCEPT_ANNOTATION,
    RATIONALE_ANNOTATION,
    ParseError,
    format_concepts,
    parse_concepts,
    parse_rationale,
)
from llm.roles import Role
from streams.records import AnnotatedSeed, SeedProblem
from streams.topics import SEEDS, SEEDS_ANNOTATED, VERDICTS
from workers.settings import SEED_LEVELS
from workers.stage import Emit, ModelStage

if TYPE_CHECKING:
    from promptcot.settings import Settings


def uses_teacher(settings: Settings) -> bool:
    """Does annotation call the teacher model (``annotate.rationale_source``)?"""
    cfg = settings.annotate
    if cfg.rationale_source != "auto":
        return cfg.rationale_source == "model"
    return cfg.concept_source == "model" or bool(settings.models.annotator.model)


class AnnotateStage(ModelStage[SeedProblem]):
    name = "annotate"
    input = SEEDS
    outputs = (SEEDS_ANNOTATED, VERDICTS)
    roles = (Role.ANNOTATOR,)

    def setup(self) -> None:
        if uses_teacher(self.settings):  # no teacher, no model to load
            super().setup()

    def _continuous(self) -> bool:
        # Without a teacher no backend is looked up (that would load it): whole micro-batches.
        return uses_teacher(self.settings) and super()._continuous()

    def _concepts(self, seeds: list[SeedProblem]) -> list[list[str] | ParseError]:
        cfg = self.settings.annotate
        if cfg.concept_source == "lexicon":
            from workers.lexicon import annotate_with_lexicon

            out: list[list[str] | ParseError] = []
            for seed in seeds:
                found = annotate_with_lexicon(seed.text, seed.domain, cfg.concepts_per_seed)
                out.append(found if found else ParseError("missing_concepts", "no lexicon match"))
            return out
        teacher = self.backend(Role.ANNOTATOR)
        prompts = [
            CONCEPT_ANNOTATION.render(teacher, k=cfg.concepts_per_seed, problem=s.text)
            for s in seeds
        ]
        out = []
        for c in self._generate(prompts, list(CONCEPT_ANNOTATION.stop)):
            try:
                if not c.ok:
                    raise ParseError(c.error or "generation_failed")
                out.append(parse_concepts(c.text, cfg.concepts_per_seed, truncated=c.truncated))
            except ParseError as exc:
                out.append(exc)
        return out

    def process(self, records: list[SeedProblem]) -> list[Emit]:
        if not uses_teacher(self.settings):
            return [self._from_seed(seed) for seed in records]
        teacher = self.backend(Role.ANNOTATOR)
        version = teacher.model_version  # before the calls: a reload may come during them
        models = {str(Role.ANNOTATOR): version}
        emits: list[Emit] = []
        ready: list[tuple[SeedProblem, list[str]]] = []
        for seed, concepts in zip(records, self._concepts(records), strict=True):
            if isinstance(concepts, ParseError):
                emits.append(self.reject(seed, concepts.reason, concepts.detail, models=models))
            else:
                ready.append((seed, concepts))
        prompts = [
            RATIONALE_ANNOTATION.render(teacher, concepts=format_concepts(c), problem=s.text)
            for s, c in ready
        ]
        completions = self._generate(prompts, list(RATIONALE_ANNOTATION.stop))
        for (seed, concepts), c in zip(ready, completions, strict=True):
            try:
                if not c.ok:
                    raise ParseError(c.error or "generation_failed")
                rationale = parse_rationale(c.text, truncated=c.truncated)
            except ParseError as exc:
                emits.append(self.reject(seed, exc.reason, exc.detail, models=models))
                continue
            emits.append(
                self.emit(
                    SEEDS_ANNOTATED,
                    AnnotatedSeed.derived_from(
                        seed,
                        models=models,
                        templates={
                            CONCEPT_ANNOTATION.name: CONCEPT_ANNOTATION.hash,
                            RATIONALE_ANNOTATION.name: RATIONALE_ANNOTATION.hash,
                        },
                        seed_id=seed.id,
                        annotator=version,
                        domain=seed.domain,
                        text=seed.text,
                        concepts=concepts,
                        rationale=rationale,
                        difficulty=SEED_LEVELS.get(seed.source),
                    ),
                )
            )
        return emits

    def _from_seed(self, seed: SeedProblem) -> Emit:
        from workers.annotation import ANNOTATOR, annotate_from_seed

        cfg = self.settings.annotate
        try:
            concepts, rationale = annotate_from_seed(
                seed, cfg.concepts_per_seed, cfg.rationale_max_chars
            )
        except ParseError as exc:
            return self.reject(seed, exc.reason, exc.detail, models={})  # no model judged it
        return self.emit(
            SEEDS_ANNOTATED,
            AnnotatedSeed.derived_from(
                seed,
                seed_id=seed.id,
                annotator=ANNOTATOR,
                domain=seed.domain,
                text=seed.text,
                concepts=concepts,
                rationale=rationale,
                difficulty=SEED_LEVELS.get(seed.source),
            ),
        )

    def _generate(self, prompts: list[str], stop: list[str]) -> list[Completion]:
        cfg = self.settings.annotate
        return self.generate_one(
            Role.ANNOTATOR,
            prompts,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            stop=stop or None,
            seed=0,
        )
