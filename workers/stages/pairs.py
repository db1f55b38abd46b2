"""verdicts -> pairs: preference pairs on kept problems (chosen = a passing rollout, rejected = a
failing one), in the prompt/chosen/rejected shape TRL's DPOTrainer reads."""

from __future__ import annotations

from collections.abc import Iterable

from llm.prompts import SOLVER_BY_DOMAIN
from streams.records import PreferencePair, Verdict
from streams.topics import PAIRS, VERDICTS
from workers.stage import Emit, Stage


def build_pairs(verdict: Verdict, prompt: str, cap: int) -> list[PreferencePair]:
    """Up to ``cap`` pairs; identical texts are dropped and no pair uses one text twice, so each
    pair carries a real preference signal."""
    if not verdict.accepted:
        return []
    chosen = _unique(r.text for r in verdict.rollouts if r.passed)
    rejected = [
        t for t in _unique(r.text for r in verdict.rollouts if not r.passed) if t not in set(chosen)
    ]
    pairs: list[PreferencePair] = []
    for good, bad in zip(chosen, rejected, strict=False):  # disjoint: no text reused
        if len(pairs) >= cap:
            break
        pairs.append(
            PreferencePair.derived_from(
                verdict,
                problem_id=verdict.subject_id,
                pair_index=len(pairs),
                domain=verdict.domain,
                prompt=prompt,
                chosen=good,
                rejected=bad,
            )
        )
    return pairs


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t.strip()))


class PairsStage(Stage[Verdict]):
    name = "pairs"
    input = VERDICTS
    outputs = (PAIRS,)

    def process(self, records: list[Verdict]) -> list[Emit]:
        emits = []
        for verdict in records:
            if not verdict.accepted:
                continue
            # The solver's user message; trainers render it with their model's chat template.
            prompt = SOLVER_BY_DOMAIN[verdict.domain].user_text(problem=verdict.problem)
            for pair in build_pairs(verdict, prompt, self.settings.pairs.max_pairs_per_problem):
                emits.append(self.emit(PAIRS, pair))
        return emits
