"""seeds.annotated -> rationales: the E-step's sampling half.

For each annotated seed (c, x), q_φ samples K rationales z; each is scored under the current
prompt model p_θ with R(z) = log p_θ(x | z, c) + log p_θ(z | c), both teacher-forced on exactly
the text p_θ would generate after its synthesis prompt. The trainer keeps the best per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.prompts import (
    RATIONALE_MODEL,
    SYNTHESIS,
    ParseError,
    format_concepts,
    parse_rationale,
    synthesis_fields,
    synthesis_parts,
)
from llm.roles import Role
from streams.records import AnnotatedSeed, Rationale
from streams.topics import RATIONALES, SEEDS_ANNOTATED, VERDICTS
from workers.stage import Emit, ModelStage


@dataclass(frozen=True)
class RewardTerms:
    logp_rationale: float  # log p_θ(z | c)
    logp_problem: float  # log p_θ(x | z, c)

    @property
    def reward(self) -> float:
        return self.logp_rationale + self.logp_problem


def reward_inputs(
    backend, seed: AnnotatedSeed, rationale: str
) -> tuple[tuple[str, str], tuple[str, str]]:
    """(prompt, continuation) pairs for the two terms, on p_θ's own synthesis format."""
    prompt = SYNTHESIS.render(
        backend, **synthesis_fields(seed.concepts, seed.difficulty or "", seed.domain)
    )
    z_part, x_part = synthesis_parts(rationale, seed.text)
    return (prompt, z_part), (prompt + z_part, x_part)


def rewards(backend, seed: AnnotatedSeed, rationales: list[str]) -> list[RewardTerms | str]:
    """Reward terms per rationale, or the scoring error's reason code."""
    prompts, continuations = [], []
    for z in rationales:
        (p1, c1), (p2, c2) = reward_inputs(backend, seed, z)
        prompts += [p1, p2]
        continuations += [c1, c2]
    scores = backend.score(prompts, continuations) if prompts else []
    out: list[RewardTerms | str] = []
    for i in range(0, len(scores), 2):
        z_score, x_score = scores[i], scores[i + 1]
        if not z_score.ok or not x_score.ok:
            out.append(z_score.error or x_score.error or "score_failed")
        else:
            out.append(RewardTerms(z_score.total_logprob, x_score.total_logprob))
    return out


class RationaleStage(ModelStage[AnnotatedSeed]):
    name = "rationale"
    input = SEEDS_ANNOTATED
    outputs = (RATIONALES, VERDICTS)
    roles = (Role.RATIONALE_MODEL, Role.PROMPT_MODEL)

    def process(self, records: list[AnnotatedSeed]) -> list[Emit]:
        cfg = self.settings.rationale
        q_model, p_model = self.backend(Role.RATIONALE_MODEL), self.backend(Role.PROMPT_MODEL)
        versions = {
            Role.RATIONALE_MODEL: q_model.model_version,
            Role.PROMPT_MODEL: p_model.model_version,
        }
        prompts = [
            RATIONALE_MODEL.render(q_model, concepts=format_concepts(s.concepts), problem=s.text)
            for s in records
        ]
        samples = self.generate(
            Role.RATIONALE_MODEL,
            prompts,
            n=cfg.samples,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            stop=list(RATIONALE_MODEL.stop),
            seed=int(records[0].id[-8:], 16) if records else 0,
        )
        emits: list[Emit] = []
        for annotated, completions in zip(records, samples, strict=True):
            parsed: list[tuple[int, str]] = []
            failures: dict[str, int] = {}
            for i, c in enumerate(completions):
                try:
                    if not c.ok:
                        raise ParseError(c.error or "generation_failed")
                    parsed.append((i, parse_rationale(c.text, truncated=c.truncated)))
                except ParseError as exc:
                    failures[exc.reason] = failures.get(exc.reason, 0) + 1
            terms = rewards(p_model, annotated, [z for _, z in parsed])
            kept = 0
            for (index, z), term in zip(parsed, terms, strict=True):
                if isinstance(term, str):
                    failures[term] = failures.get(term, 0) + 1
                    continue
                kept += 1
                emits.append(
                    self.emit(
                        RATIONALES,
                        Rationale.derived_from(
                            annotated,
                            models=versions,
                            templates={
                                RATIONALE_MODEL.name: RATIONALE_MODEL.hash,
                                SYNTHESIS.name: SYNTHESIS.hash,
                            },
                            seed_id=annotated.seed_id,
                            **annotated.payload(),
                            text=z,
                            sample_index=index,
                            reward=term.reward,
                            logp_problem=term.logp_problem,
                            logp_rationale=term.logp_rationale,
                            rationale_model=versions[Role.RATIONALE_MODEL],
                            prompt_model=versions[Role.PROMPT_MODEL],
                            epoch=annotated.epoch,
                        ),
                    )
                )
            if not kept:  # no usable sample: the seed's fate is still recorded
                reason = max(failures, key=failures.get) if failures else "no_samples"
                emits.append(
                    self.reject(
                        annotated, reason, f"0 of {len(completions)} rationales usable: {failures}"
                    )
                )
        return emits
