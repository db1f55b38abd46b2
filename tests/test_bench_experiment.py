"""bench/experiment.py end to end on the tiny model with a small factory folder written here:
C trains on exactly the rollouts that agree with the designer's reference (untruncated, a final
answer, accepted problems only), C0 on as many unverified first-finished rollouts, B is half A,
the report has every arm, goal and interval, and A's training moves the gold NLL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm.backends.base import Completion
from streams.records import CandidateProblem

torch = pytest.importorskip("torch")

# (problem, designer rationale, rollouts: (final answer or text, truncated))
FACTORY = [
    # designer says 7, 2 of 8 agree untruncated (a third agrees but is cut): accepted
    (
        "Ana has 3 apples and gets 4 more. How many apples does she have?",
        "Combine two groups: 3 + 4 = 7, so the answer is 7.",
        [("7", False), ("5", False), ("7", True), ("7", False), ("6", False), ("5", False)]
        + [("8", False), ("5", False)],
    ),
    # no stated answer: rejected (no reference), whatever the rollouts say
    (
        "Ben has 2 pencils and buys 2 more. How many pencils now?",
        "Combine two groups of pencils.",
        [("4", False)] * 8,
    ),
    # designer says 10, every rollout agrees: too easy
    (
        "Carla has 5 coins and finds 5 more. How many coins does she have?",
        "5 + 5 = 10, so the answer is 10.",
        [("10", False)] * 8,
    ),
    # designer says 12, 3 agree: accepted
    (
        "Dev has 20 cards and gives 8 away. How many cards are left?",
        "Take away: 20 - 8 = 12, so the answer is 12.",
        [("12", False), ("11", False), ("12", False), ("3", True), ("12", False)]
        + [("28", False), ("2", False), ("9", False)],
    ),
]


def _text(answer: str, i: int) -> str:
    return f"Step {i}: we work it out.\nThe answer is \\boxed{{{answer}}}."


def write_factory(folder: Path) -> list[CandidateProblem]:
    folder.mkdir(parents=True)
    cands = []
    with (folder / "candidates.jsonl").open("w") as fc, (folder / "rollouts.jsonl").open("w") as fr:
        for n, (problem, rationale, rollouts) in enumerate(FACTORY):
            c = CandidateProblem(
                concept_set_id=f"cs{n}",
                domain="math",
                difficulty="grade school",
                concepts=["addition"],
                rationale=rationale,
                problem=problem,
            )
            cands.append(c)
            fc.write(c.model_dump_json() + "\n")
            completions = [
                Completion(
                    _text(a, i) if not cut else f"Step {i}: adding {a}",
                    50,
                    20,
                    "length" if cut else "stop",
                )
                for i, (a, cut) in enumerate(rollouts)
            ]
            fr.write(json.dumps({"id": c.id, "completions": [vars(x) for x in completions]}))
            fr.write("\n")
        # a candidate whose rollouts are not written yet (the factory run still going)
        late = CandidateProblem(
            concept_set_id="cs-late",
            domain="math",
            difficulty="grade school",
            concepts=["addition"],
            rationale="1 + 1 = 2, so the answer is 2.",
            problem="Eva has 1 shell and finds 1 more. How many shells?",
        )
        fc.write(late.model_dump_json() + "\n")
    return cands


def test_the_experiment_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    from bench.experiment import Budget, run, table
    from promptcot.settings import Settings

    factory = tmp_path / "factory"
    c1, c2, c3, c4 = write_factory(factory)
    settings = Settings(
        trainer={
            "profile": "cpu",
            "checkpoint_dir": str(tmp_path / "unused"),
            "torch_threads": 1,
            "sft": {"lr": 5e-3},
            "m_step": {"lr": 5e-3, "max_rationale_tokens": 48},
        },
        models={
            r: {"model": str(tiny_model_dir)} for r in ("prompt_model", "rationale_model", "solver")
        },
        metrics={"port": 0},
    )
    out = tmp_path / "out"
    budget = Budget(solver_steps=4, em_steps=2, eval_items=6, em_seeds=4, heldout_seeds=4)
    report = run(settings, factory, out, budget, log=lambda msg: None)

    # The factory: verdicts of the verify stage on the recorded rollouts, designer reference.
    f = report["factory"]
    assert (f["candidates_written"], f["candidates_with_rollouts"], f["accepted"]) == (5, 4, 2)
    assert f["reasons"] == {"accepted": 2, "no_reference": 1, "too_easy": 1}
    chosen = json.loads((out / "examples.json").read_text())
    # C: exactly the agreeing, untruncated rollouts of the accepted problems.
    assert chosen["C"] == [f"{c1.id}#0", f"{c1.id}#3", f"{c4.id}#0", f"{c4.id}#2", f"{c4.id}#4"]
    # C0: as many, each candidate's first finished rollout in turn, whatever it answers.
    assert chosen["C0"] == [f"{c.id}#0" for c in (c1, c2, c3, c4)] + [f"{c1.id}#1"]

    solver = report["solver"]
    assert list(solver) == ["base", "A", "B", "C", "C0"]
    # A: one pass of 4 steps of 4 GSM8K items; B: its first half, then C's 5 traces in turn.
    assert [solver[a]["examples"] for a in solver] == [0, 16, 16, 5, 5]
    assert {solver[a]["optimizer_steps"] for a in ("A", "B", "C", "C0")} == {4}
    for s in solver.values():
        low, high = s["gold_nll_interval"]
        assert s["gold_items"] == 6 and low <= s["gold_nll_per_token"] <= high
    # Training on GSM8K-train gold solutions lowers the gold NLL of GSM8K-test solutions.
    assert solver["A"]["gold_nll_per_token"] < solver["base"]["gold_nll_per_token"]

    em = report["em"]
    assert list(em["summary"]) == ["cold_start", "q_phi", "annotation", "none"]
    assert (em["m_step_seeds"], em["heldout_seeds"]) == (4, 4)
    assert {em["arms"][a]["optimizer_steps"] for a in ("q_phi", "annotation", "none")} == {2}
    goals = report["goals"]
    assert [(g["a"], g["b"]) for g in goals] == [
        ("A", "base"),
        ("B", "A"),
        ("C", "base"),
        ("C", "C0"),
        ("q_phi", "annotation"),
        ("q_phi", "annotation"),
    ]
    for g in goals:
        p = g["paired"]
        assert p["low"] <= p["difference"] <= p["high"]
        expected = "holds" if p["high"] < 0 else "fails" if p["low"] > 0 else "no evidence"
        assert g["status"] == expected
    assert (out / "report.png").stat().st_size > 1000
    text = table(report)
    assert "C0" in text and "wall time" in text

    # Started again, it takes every arm from the folder: the same figures.
    again = run(settings, factory, out, budget, log=lambda msg: None)
    kept = json.loads((out / "report.json").read_text())
    assert json.loads(json.dumps(again["solver"])) == kept["solver"]
    assert json.loads(json.dumps(again["em"]["summary"])) == kept["em"]["summary"]


def test_a_report_of_the_em_arms_alone_is_plotted(tmp_path):
    """`--solver-arms none` leaves no solver arm: the plot has the EM panel only (it raised on
    the empty solver panel), and a report with no arm at all draws nothing."""
    from bench.experiment import plot

    summary = {
        arm: {"heldout": {"nll_per_token": v, "interval": [v - 0.02, v + 0.02]}}
        for arm, v in (("q_phi", 1.87), ("annotation", 1.86), ("none", 1.84))
    }
    plot({"solver": {}, "em": {"summary": summary}}, tmp_path / "em.png")
    assert (tmp_path / "em.png").stat().st_size > 0
    plot({"solver": {}, "em": {}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
