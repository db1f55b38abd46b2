"""concepts -> candidates: p_θ writes a rationale, then a problem, between explicit delimiters.

Generation runs in two phases by default: the rationale up to its closing delimiter, then the
problem after a forced ``</rationale><problem>`` bridge. The output format is the paper's; the
bridge only keeps a small model from wandering off it. Outputs missing either part are rejected
with the parser's reason code.
"""

from __future__ import annotations

from llm.backends.base import Completion
from llm.prompts import (
    PROBLEM_CLOSE,
    PROBLEM_OPEN,
    RATIONALE_CLOSE,
    SYNTHESIS,
    ParseError,
    parse_synthesis,
    synthesis_fields,
)
from llm.roles import Role
from streams.records import CandidateProblem, ConceptSet, Record, content_hash
from streams.topics import CANDIDATES, CONCEPTS, VERDICTS
from workers.stage import Emit, ModelStage

BRIDGE = f"\n{RATIONALE_CLOSE}\n{PROBLEM_OPEN}\n"


def batch_seed(records: list[Record]) -> int:
    """Same batch, same samples: a redelivered batch reproduces its candidates (and their ids)."""
    return int(content_hash([r.id for r in records], 8), 16)


class GenerateStage(ModelStage[ConceptSet]):
    name = "generate"
    input = CONCEPTS
    outputs = (CANDIDATES, VERDICTS)
    roles = (Role.PROMPT_MODEL,)

    def process(self, records: list[ConceptSet]) -> list[Emit]:
        p_model = self.backend(Role.PROMPT_MODEL)
        version = p_model.model_version  # stamped on everything this batch emits
        models = {Role.PROMPT_MODEL: version}
        prompts = [
            SYNTHESIS.render(p_model, **synthesis_fields(cs.concepts, cs.difficulty, cs.domain))
            for cs in records
        ]
        seed = batch_seed(records)
        gen = self.settings.generation
        rationales = self._generate(
            prompts, gen.max_rationale_tokens, [RATIONALE_CLOSE, PROBLEM_OPEN], seed
        )
        emits: list[Emit] = []
        pending: list[tuple[ConceptSet, str, Completion]] = []
        for cs, prompt, z in zip(records, prompts, rationales, strict=True):
            if not z.ok:
                emits.append(
                    self.reject(
                        cs, z.error or "generation_failed", "rationale phase", models=models
                    )
                )
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
                emits.append(
                    self.reject(cs, x.error or "generation_failed", "problem phase", models=models)
                )
                continue
            # A model that writes the opening delimiter we already wrote: drop the echo.
            problem_text = x.text.lstrip().removeprefix(PROBLEM_OPEN)
            completion = z.text.rstrip() + BRIDGE + problem_text
            try:
                parsed = parse_synthesis(completion, truncated=x.truncated)
            except ParseError as exc:
                emits.append(self.reject(cs, exc.reason, completion[-500:], models=models))
                continue
            emits.append(
                self.emit(
                    CANDIDATES,
                    CandidateProblem.derived_from(
                        cs,
                        models=models,
                        templates={SYNTHESIS.name: SYNTHESIS.hash},
                        concept_set_id=cs.id,
                        generator=version,
                        **cs.payload(parsed.problem),
                        rationale=parsed.rationale,
                    ),
                )
            )
        return emits

    def _generate(
        self, prompts: list[str], max_tokens: int, stop: list[str], seed: int
    ) -> list[Completion]:
        gen = self.settings.generation
        return self.generate_one(
            Role.PROMPT_MODEL,
            prompts,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
        )
