"""Traces (workers/stages/traces.py): the verified solutions of accepted problems, for solver
SFT; unit rules, then the stage through the real embedded broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from factory_harness import read_records, wait_until

from promptcot.settings import Settings
from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import Rollout, SolverTrace, Verdict
from streams.topics import TRACES, VERDICTS, ensure_topics
from workers.runtime import run_stages
from workers.stages.traces import TracesStage, build_traces

SOLVED = "2 + 3 = 5, so \\boxed{5}"


def _verdict(subject: str = "cand_1", **kw) -> Verdict:
    base = dict(
        subject_id=subject,
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        problem="What is 2 + 3?",
        reference_answer="5",
        reference_source="designer",
        pass_rate=0.5,
        rollouts=[
            Rollout(text=SOLVED, answer="5", passed=True, n_tokens=9),
            Rollout(text="2 + 3 = 5 and then we add", failure="truncated"),
            Rollout(text="\\boxed{6}", answer="6", failure="disagrees"),
            Rollout(text="Hence \\boxed{5}", answer="5", passed=True, n_tokens=3),
            Rollout(text=SOLVED, answer="5", passed=True, n_tokens=9),  # a repeat
            Rollout(text="the sum is five", failure="no_answer"),
        ],
    )
    return Verdict(**{**base, **kw})


def test_traces_are_the_passing_rollouts_of_an_accepted_problem():
    traces = build_traces(_verdict(), "Solve: What is 2 + 3?", cap=4)
    assert [(t.source, t.index, t.completion) for t in traces] == [
        ("solver", 0, SOLVED),
        ("solver", 3, "Hence \\boxed{5}"),
    ]
    t = traces[0]
    assert (t.problem_id, t.prompt, t.reference_answer, t.n_tokens) == (
        "cand_1",
        "Solve: What is 2 + 3?",
        "5",
        9,
    )
    assert t.parent_ids == [_verdict().id] and t.domain == "math"
    assert [t.id for t in build_traces(_verdict(), "other prompt", cap=4)] == [
        t.id for t in traces
    ]  # a redelivered verdict gives the same ids
    assert len(build_traces(_verdict(), "p", cap=1)) == 1


def test_a_teacher_gives_one_trace_and_unverified_references_give_none():
    teacher = [
        Rollout(text="\\boxed{7}", answer="7", failure="disagrees"),
        Rollout(text="Teacher: 2 + 3 = 5. \\boxed{5}", answer="5", passed=True),
        Rollout(text="Again \\boxed{5}", answer="5", passed=True),
    ]
    verdict = _verdict(reference_source="teacher", teacher_rollouts=teacher)
    teacher_traces = [t for t in build_traces(verdict, "p", cap=4) if t.source == "teacher"]
    assert [(t.index, t.completion) for t in teacher_traces] == [(1, teacher[1].text)]
    # The solver agreeing with itself is no verification; a rejected problem has no traces.
    assert build_traces(_verdict(reference_source="majority"), "p", cap=4) == []
    assert build_traces(_verdict(reference_source=""), "p", cap=4) == []
    assert build_traces(_verdict(accepted=False, reason="too_easy"), "p", cap=4) == []


@pytest.mark.slow
def test_the_traces_stage_through_the_real_broker(tmp_path):
    """Accepted and rejected verdicts in, the accepted ones' traces out, once each, with the
    solver's prompt rendered as pairs carry it."""
    with EmbeddedBroker() as broker:
        settings = Settings(
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "namespace": f"tr{uuid.uuid4().hex[:8]}",
                "partitions": 2,
            },
            stages={"traces": {"batch_size": 4, "batch_within_s": 0.2}},
            worker={"journal_dir": str(tmp_path / "journal")},
            metrics={"port": 0},
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            2,
            1,
        )
        verdicts = [_verdict(f"cand_{i}") for i in range(5)] + [
            _verdict("cand_x", accepted=False, reason="no_reference"),
            _verdict("cand_y", reference_source="majority"),
        ]
        publish(settings.kafka, broker.bootstrap_servers, VERDICTS, verdicts)

        def traces() -> list[SolverTrace]:
            return [r for r, _ in read_records(settings, "traces", idle_s=0.5) if r is not None]

        async def until() -> None:
            await wait_until(lambda: len(traces()) >= 10, timeout_s=90, poll_s=0.5)

        asyncio.run(
            run_stages(
                settings,
                [TracesStage(settings)],
                broker.bootstrap_servers,
                app_id=f"{settings.kafka.namespace}-g",
                until=until,
            )
        )
        got = traces()
    assert len(got) == 10 and len({t.id for t in got}) == 10
    assert {t.problem_id for t in got} == {f"cand_{i}" for i in range(5)}
    assert all(t.prompt.endswith("Problem:\nWhat is 2 + 3?") for t in got)
    assert TRACES.record is SolverTrace


def test_up_runs_the_traces_stage_with_or_without_the_trainer():
    from promptcot.startup import stage_names

    assert "traces" in stage_names(None, train=False)
    assert "traces" in stage_names(None, train=True)
