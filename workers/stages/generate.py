"""concepts -> candidates: p_θ writes a rationale, then a problem, between explicit delimiters.

Generation runs in two phases by default: the rationale up to its closing delimiter, then the
problem after a forced ``</rationale><problem>`` bridge. The output format is the paper's; the
bridge only keeps a small model from wandering off it. Outputs missing either part are rejected
with the parser's reason code.
"""

from __future__ import annotations

from streams.records import CandidateProblem, ConceptSet, Record, content_hash
from streams.topics import CANDIDATES, CONCEPTS, VERDICTS
from workers.backends.base import Completion
from workers.prompts import (
    PROBLEM_CLOSE,
    PROBLEM_OPEN,
    RATIONALE_CLOSE,
    SYNTHESIS,
    ParseError,
    parse_synthesis,
    synthesis_fields,
)
from workers.roles import backend_for
from workers.stage import Emit, Stage

ROLE = "prompt_model"
BRIDGE = f"\n{RATIONALE_CLOSE}\n{PROBLEM_OPEN}\n"


def batch_seed(records: list[Record]) -> int:
    """Same batch, same samples: a redelivered batch reproduces its candidates (and their ids)."""
    return int(content_hash([r.id for r in records], 8), 16)


class GenerateStage(Stage):
    name = "generate"
    input = CONCEPTS
    outputs = (CANDIDATES, VERDICTS)

    @property
    def backend(self):  # looked up per batch: a model reload takes effect at once
        return backend_for(self.settings, ROLE)

    def setup(self) -> None:
        self.backend  # noqa: B018 - load the model before the first batch

    def process(self, records: list[Record]) -> list[Emit]:
        gen = self.settings.generation
        sets: list[ConceptSet] = [r for r in records if isinstance(r, ConceptSet)]
        prompts = [
            SYNTHESIS.render(self.backend, **synthesis_fields(cs.concepts, cs.difficulty, cs.domain))
            for cs in sets
        ]
        seed = batch_seed(sets)
        rationales = self._generate(prompts, gen.max_rationale_tokens, [RATIONALE_CLOSE, PROBLEM_OPEN], seed)
        emits: list[Emit] = []
        pending: list[tuple[ConceptSet, str, Completion]] = []
        for cs, prompt, z in zip(sets, prompts, rationales, strict=True):
            if not z.ok:
                emits.append(self.reject(cs, z.error or "generation_failed", "rationale phase"))
                continue
            pending.append((cs, prompt, z))
        problems = self._generate(
            [prompt + z.text.rstrip() + BRIDGE for _, prompt, z in pending],
            gen.max_problem_tokens,
            [PROBLEM_CLOSE],
            seed + 1,
        )
        for (cs, _, z), x in zip(pending, problems, strict=True):
            if not x.ok:
                emits.append(self.reject(cs, x.error or "generation_failed", "problem phase"))
                continue
            # A model that writes the opening delimiter we already wrote: drop the echo.
            problem_text = x.text.lstrip().removeprefix(PROBLEM_OPEN)
            completion = z.text.rstrip() + BRIDGE + problem_text
            try:
                parsed = parse_synthesis(completion, truncated=x.truncated)
            except ParseError as exc:
                emits.append(self.reject(cs, exc.reason, completion[-500:]))
                continue
            candidate = CandidateProblem(
                concept_set_id=cs.id,
                generator=self.backend.model_version,
                domain=cs.domain,
                difficulty=cs.difficulty,
                concepts=cs.concepts,
                rationale=parsed.rationale,
                problem=parsed.problem,
                parent_ids=[cs.id],
                lineage=cs.lineage.extend(
                    cs.id,
                    models={ROLE: self.backend.model_version},
                    templates={SYNTHESIS.name: SYNTHESIS.hash},
                ),
            )
            emits.append(self.emit(CANDIDATES, candidate))
        return emits

    def _generate(self, prompts: list[str], max_tokens: int, stop: list[str], seed: int) -> list[Completion]:
        if not prompts:
            return []
        gen = self.settings.generation
        out = self.backend.generate(
            prompts, n=1, temperature=gen.temperature, top_p=gen.top_p,
            max_tokens=max_tokens, stop=stop, seed=seed,
        )
        completions = [c[0] for c in out]
        self.count_tokens(ROLE, completions)
        return completions
