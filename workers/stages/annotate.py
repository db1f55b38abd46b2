"""seeds -> seeds.annotated: the cold-start teacher names each seed's foundational concepts and
reverse-engineers the rationale that would lead a designer from them to exactly this problem."""

from __future__ import annotations

from streams.records import AnnotatedSeed, Record, SeedProblem
from streams.topics import SEEDS, SEEDS_ANNOTATED, VERDICTS
from workers.prompts import (
    CONCEPTS,
    RATIONALE_ANNOTATION,
    ParseError,
    format_concepts,
    parse_concepts,
    parse_rationale,
)
from workers.roles import backend_for
from workers.stage import Emit, Stage

ROLE = "annotator"


class AnnotateStage(Stage):
    name = "annotate"
    input = SEEDS
    outputs = (SEEDS_ANNOTATED, VERDICTS)

    @property
    def backend(self):
        return backend_for(self.settings, ROLE)

    def setup(self) -> None:
        self.backend  # noqa: B018 - load the model before the first batch

    def _concepts(self, seeds: list[SeedProblem]) -> list[list[str] | ParseError]:
        cfg = self.settings.annotate
        if cfg.concept_source == "lexicon":
            from workers.lexicon import annotate_with_lexicon

            out: list[list[str] | ParseError] = []
            for seed in seeds:
                found = annotate_with_lexicon(seed.text, seed.domain, cfg.concepts_per_seed)
                out.append(found if found else ParseError("missing_concepts", "no lexicon match"))
            return out
        prompts = [CONCEPTS.render(self.backend, k=cfg.concepts_per_seed, problem=s.text) for s in seeds]
        completions = self._generate(prompts, cfg.max_tokens, list(CONCEPTS.stop))
        out = []
        for c in completions:
            if not c.ok:
                out.append(ParseError(c.error or "generation_failed"))
                continue
            try:
                out.append(parse_concepts(c.text, cfg.concepts_per_seed, truncated=c.truncated))
            except ParseError as exc:
                out.append(exc)
        return out

    def process(self, records: list[Record]) -> list[Emit]:
        seeds = [r for r in records if isinstance(r, SeedProblem)]
        emits: list[Emit] = []
        ready: list[tuple[SeedProblem, list[str]]] = []
        for seed, concepts in zip(seeds, self._concepts(seeds), strict=True):
            if isinstance(concepts, ParseError):
                emits.append(self.reject(seed, concepts.reason, concepts.detail))
            else:
                ready.append((seed, concepts))
        prompts = [
            RATIONALE_ANNOTATION.render(self.backend, concepts=format_concepts(c), problem=s.text)
            for s, c in ready
        ]
        for (seed, concepts), c in zip(ready, self._generate(prompts, self.settings.annotate.max_tokens, list(RATIONALE_ANNOTATION.stop)), strict=True):
            try:
                if not c.ok:
                    raise ParseError(c.error or "generation_failed")
                rationale = parse_rationale(c.text, truncated=c.truncated)
            except ParseError as exc:
                emits.append(self.reject(seed, exc.reason, exc.detail))
                continue
            annotated = AnnotatedSeed(
                seed_id=seed.id,
                annotator=self.backend.model_version,
                domain=seed.domain,
                text=seed.text,
                concepts=concepts,
                rationale=rationale,
                parent_ids=[seed.id],
                lineage=seed.lineage.extend(
                    seed.id,
                    models={ROLE: self.backend.model_version},
                    templates={CONCEPTS.name: CONCEPTS.hash, RATIONALE_ANNOTATION.name: RATIONALE_ANNOTATION.hash},
                ),
            )
            emits.append(self.emit(SEEDS_ANNOTATED, annotated))
        return emits

    def _generate(self, prompts: list[str], max_tokens: int, stop: list[str]):
        if not prompts:
            return []
        cfg = self.settings.annotate
        out = [c[0] for c in self.backend.generate(
            prompts, n=1, temperature=cfg.temperature, max_tokens=max_tokens,
            stop=stop or None, seed=0,
        )]
        self.count_tokens(ROLE, out)
        return out
