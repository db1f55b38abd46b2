"""verdicts -> pairs: preference pairs on kept problems, in the prompt/chosen/rejected shape TRL's
DPOTrainer reads. Labelled by the reference: chosen = a rollout that agrees with it; rejected
(math) = a rollout whose final answer disagrees with it, never one that was cut by the token
budget or stated no answer (that would teach "stop early", not "be right"); code = a program
that failed a test."""

from __future__ import annotations

from collections.abc import Iterable

from llm.prompts import SOLVER_BY_DOMAIN
from streams.records import PreferencePair, Rollout, Verdict
from streams.topics import PAIRS, VERDICTS
from verification.mathcheck.reference import WRONG_ANSWER
from workers.stage import Emit, Stage


def build_pairs(verdict: Verdict, prompt: str, cap: int) -> list[PreferencePair]:
    """Up to ``cap`` pairs; identical texts are dropped and no pair uses one text twice, so each
    pair carries a real preference signal."""
    if not verdict.accepted:
        return []
    chosen = _unique(r.text for r in verdict.rollouts if r.passed)
    rejected = [
        t
        for t in _unique(r.text for r in verdict.rollouts if _rejectable(verdict, r))
        if t not in set(chosen)
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


def _rejectable(verdict: Verdict, rollout: Rollout) -> bool:
    """A rollout that is wrong, not merely unfinished: for math, a final answer that disagrees
    with the reference; for code, any failing program."""
    if rollout.passed:
        return False
    return verdict.domain != "math" or rollout.failure == WRONG_ANSWER


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
