"""Hostile model text through the real embedded broker (issue 21): the verify stage, with a
scripted solver answering each problem with the text a test chooses, decides every candidate of
a batch holding a lone surrogate, 200 KB of ``\\(``, 10,000 brackets, eight power towers and a
NUL; each gets one verdict with its reason, and its batch-mates theirs."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from factory_harness import read_records, wait_until
from hostile_text import BRACKETS, NUL, OPENERS, SURROGATE, TOWERS
from scripted_backend import ScriptedBackend

from llm.roles import Role
from promptcot.settings import Settings
from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import CandidateProblem, DeadLetter, Verdict
from streams.topics import CANDIDATES_UNIQUE, ensure_topics
from workers.runtime import run_stages
from workers.stages.verify import VerifyStage

pytestmark = pytest.mark.slow
# The batch decided, the worker's and the math worker's starts included, on a loaded 2-core
# machine (measured: 27 s at load 5; at load 17 the math worker took over 60 s to start).
BOUND_S = 300

# problem tag -> (problem text, the eight rollouts' answers)
CASES = {
    "plain": ("A price of $40 rises by 25%. What is the new price?", ["50"] * 3 + list("12345")),
    "openers": (OPENERS, ["x+1"] * 3 + list("12345")),
    "brackets": (BRACKETS, ["(" * 200 + "1" + ")" * 200] * 4 + ["1"] * 4),
    "towers": ("Which is larger?", TOWERS),
    "surrogate": ("Find the number.", [f"5{SURROGATE[-1]}"] * 8),
    "nul": ("Find the number.", ["12"] * 3 + [NUL] * 3 + ["7", "9"]),
}


def _candidate(tag: str) -> CandidateProblem:
    return CandidateProblem(
        concept_set_id=f"cset_{tag}",
        domain="math",
        difficulty="AMC12",
        concepts=["ratios"],
        rationale="r",
        problem=f"[{tag}] {CASES[tag][0]}",
    )


def _solver(prompt: str, i: int) -> str:
    tag = next(t for t in CASES if f"[{t}]" in prompt)
    return f"We compute step by step {SURROGATE}.\n\\boxed{{{CASES[tag][1][i]}}}"


def test_a_batch_of_hostile_rollouts_and_problems_is_decided_each_with_its_reason(tmp_path):
    """Every candidate gets one verdict within BOUND_S (300 s) of the worker's start: a lone
    surrogate in every rollout (it wedged the partition for good) is a rejected verdict; a 200 KB
    ``\\(`` problem (75 s holding the GIL, then the worker exited) is decided; eight distinct power
    towers (54 s, 23 math worker restarts) are no consensus; ``1\\x002`` is not ``12``."""
    with EmbeddedBroker() as broker:
        settings = Settings(
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "namespace": f"h{uuid.uuid4().hex[:8]}",
                "partitions": 1,
            },
            stages={"verify": {"batch_size": 8, "batch_within_s": 1.0}},
            worker={"journal_dir": str(tmp_path / "journal"), "retry_backoff_s": 0.05},
            metrics={"port": 0},
            # The rollouts' answers meet each other (the opt-in plurality): the hostile part is
            # the rollouts, and a rationale of "r" states no designer answer to ask them for.
            verify={"math": {"reference": "majority"}},
        )
        kafka = settings.kafka
        ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 1, 1)
        candidates = {tag: _candidate(tag) for tag in CASES}
        publish(kafka, broker.bootstrap_servers, CANDIDATES_UNIQUE, list(candidates.values()))
        solver = ScriptedBackend(_solver, version="solver@hostile")
        stage = VerifyStage(settings, backends={Role.SOLVER: solver, Role.TEST_WRITER: solver})

        def verdicts() -> dict[str, Verdict]:
            return {r.subject_id: r for r, _ in read_records(settings, "verdicts") if r}

        async def until() -> None:
            await wait_until(lambda: len(verdicts()) >= len(CASES), BOUND_S, poll_s=0.5)

        started = time.monotonic()
        asyncio.run(run_stages(settings, [stage], broker.bootstrap_servers, until=until))
        print(f"\n{len(CASES)} hostile candidates decided in {time.monotonic() - started:.1f} s")
        got = verdicts()
        dead = [r for r, _ in read_records(settings, "deadletter") if isinstance(r, DeadLetter)]
    assert dead == []
    reasons = {tag: got[c.id].reason for tag, c in candidates.items()}
    assert reasons["plain"] == "accepted" and got[candidates["plain"].id].pass_rate == 3 / 8
    assert reasons["surrogate"] == "garbled_answer"
    assert "\ufffd" in got[candidates["surrogate"].id].rollouts[0].text  # repaired, not lost
    assert reasons["towers"] == "no_consensus"
    assert reasons["nul"] == "tied_majority"  # three 12s and three 1\x002s: two clusters
    assert set(reasons) == set(CASES)  # the 200 KB openers and the brackets: decided too
