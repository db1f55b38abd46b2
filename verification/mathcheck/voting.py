"""Majority voting over the rollouts' answers, clustered by mathematical equivalence.

The verify stage samples ``rollouts`` solutions per problem; the majority answer (clustered by
mathematical equivalence) becomes the reference, and each rollout passes if it agrees with it
(PromptCoT 2.0, section "Verification").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verification.mathcheck.answers import answer_key, as_text

if TYPE_CHECKING:
    from verification.mathcheck.oracle import EquivalenceOracle


@dataclass(frozen=True)
class VoteResult:
    """Outcome of clustering the rollouts' answers.

    ``share`` is the largest cluster's size over ALL rollouts (missing answers included);
    ``agree[i]`` says whether rollout i is in the reference cluster (all False without one);
    ``reason`` is None when a reference was chosen, else "no_answer" (no rollout answered),
    "no_consensus" (largest share < min_agreement) or "tied_majority" (two largest clusters of
    equal size: which one is right would be a coin flip).
    """

    reference: str | None
    share: float
    agree: list[bool]
    n_clusters: int
    n_missing: int
    reason: str | None

    @property
    def pass_rate(self) -> float:
        return sum(self.agree) / len(self.agree) if self.agree else 0.0


def vote(
    answers: Sequence[str | None], oracle: EquivalenceOracle, min_agreement: float
) -> VoteResult:
    """Majority answer by mathematical equivalence.

    Distinct normalized answers are visited most frequent first (ties: first seen); each joins
    the first cluster whose representative it is equivalent to, else founds a cluster. One
    oracle round trip per distinct answer (against all representatives at once). The vote's
    checks share one budget of worker time (``vote_budget_s``): hostile answers (a power tower
    that hangs sympy) cost it at most, not a timeout per pair (docs/verification.md).
    """
    normalized = [answer_key(a) if a is not None and as_text(a).strip() else None for a in answers]
    n_missing = sum(1 for n in normalized if n is None)
    counts = Counter(n for n in normalized if n is not None)
    if not counts:
        return VoteResult(None, 0.0, [False] * len(answers), 0, n_missing, "no_answer")

    representatives: list[str] = []
    cluster_of: dict[str, int] = {}
    budget = oracle.budget()  # the vote's checks share verify.math.vote_budget_s
    for text, _count in counts.most_common():  # most_common keeps first-seen order on ties
        verdicts = oracle.equivalent_many([(rep, text) for rep in representatives], budget)
        joined = next((c for c, same in enumerate(verdicts) if same), None)
        if joined is None:
            joined = len(representatives)
            representatives.append(text)
        cluster_of[text] = joined

    sizes = Counter()
    for text, count in counts.items():
        sizes[cluster_of[text]] += count
    ranked = sizes.most_common()
    best_cluster, best_size = ranked[0]
    share = best_size / len(answers)
    n_clusters = len(representatives)
    if share < min_agreement:
        reason = "no_consensus"
    elif len(ranked) > 1 and ranked[1][1] == best_size:
        reason = "tied_majority"
    else:
        agree = [n is not None and cluster_of[n] == best_cluster for n in normalized]
        return VoteResult(representatives[best_cluster], share, agree, n_clusters, n_missing, None)
    return VoteResult(None, share, [False] * len(answers), n_clusters, n_missing, reason)
