"""bench/loop.py's own wiring: --quick writes its report and uses --seeds, a failed `up` stops
the experiment with a line that points to its log, and --versions below 2 is refused."""

from __future__ import annotations

import json
import os
import sys

import pytest

from bench import loop


@pytest.mark.slow  # a cold start of the tiny model and annotate over all GSM8K train: ~1 min
def test_quick_writes_its_report_and_uses_the_seeds_given(tiny_model_dir, tmp_path, monkeypatch):
    for role in ("PROMPT_MODEL", "RATIONALE_MODEL", "SOLVER"):
        monkeypatch.setenv(f"PROMPTCOT_MODELS__{role}__MODEL", str(tiny_model_dir))
    step = {"epochs": 1.0, "batch_size": 4, "per_device_batch_size": 4, "max_seq_len": 256}
    monkeypatch.setenv("PROMPTCOT_TRAINER__COLD_START", json.dumps({**step, "seeds": 4}))
    out = tmp_path / "quick"
    loop.main(["--quick", "--out", str(out), "--seeds", "3", "--concept-sets", "2"])
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True and report["seeds"] == 3
    assert any("the 3 seeds" in r["name"] for r in report["figures"])


def test_a_failed_up_stops_the_experiment_pointing_to_its_log(tmp_path):
    log = tmp_path / "up.log"
    command = [sys.executable, "-c", "print('broker gone'); raise SystemExit(3)"]
    with pytest.raises(loop.UpFailed, match=f"exited with code 3: see {log}"):
        loop.run_up(command, dict(os.environ), log)
    assert "broker gone" in log.read_text()


def test_versions_below_two_are_refused_and_spaced_keeps_first_and_last(capsys):
    assert loop.spaced(list(range(10)), 2) == [0, 9]
    assert loop.spaced(list(range(10)), 4) == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="at least 2"):
        loop.spaced(list(range(10)), 1)
    with pytest.raises(SystemExit) as exit_:
        loop.main(["--versions", "1"])
    assert exit_.value.code == 2 and "--versions must be at least 2" in capsys.readouterr().err


def _p_version(version: int, step: str, before: float, after: float) -> dict:
    metrics = {"heldout_problem_nll_before": before, "heldout_problem_nll_after": after}
    return {"version": version, "step": step, "metrics": metrics}


def test_the_nll_goal_is_judged_over_the_em_iterations_not_the_cold_start():
    """The cold start lowers the held-out NLL a lot; M-steps that then raise it again must not
    pass for an NLL that falls over the EM iterations."""
    rising = [_p_version(1, "cold_start", 2.05, 1.82)] + [
        _p_version(v, "m_step", 1.82 + 0.02 * (v - 2), 1.82 + 0.02 * (v - 1)) for v in (2, 3, 4)
    ]
    base = {"version": 0, "step": "base", "metrics": {}, "yield": 0.1}
    by_role = {
        "prompt_model": [base, *rising[:-1], {**rising[-1], "yield": 0.8}],
        "rationale_model": [],
        "solver": [{"version": 0, "step": "base", "metrics": {}, "gsm8k_accuracy": 0.0}],
    }
    rows = {r["name"].split(" (")[0]: r for r in loop.goals(by_role)}
    em = rows["held-out problem NLL over the EM iterations"]
    assert em["value"] == pytest.approx([1.82, 1.88]) and em["ok"] is False
    assert rows["held-out problem NLL, base -> last"]["value"] == pytest.approx([2.05, 1.88])
    assert rows["EM iterations"]["ok"] is True

    falling = [_p_version(v, "m_step", 1.9 - 0.01 * v, 1.89 - 0.01 * v) for v in (2, 3, 4)]
    by_role["prompt_model"] = [base, rising[0], *falling[:-1], {**falling[-1], "yield": 0.8}]
    em = {r["name"].split(" (")[0]: r for r in loop.goals(by_role)}[
        "held-out problem NLL over the EM iterations"
    ]
    assert em["value"] == pytest.approx([1.88, 1.85]) and em["ok"] is True


def _solver(version: int, correct: list[bool], nll_per_token: float | None = None) -> dict:
    items = [
        {
            "id": f"test-{i}",
            "reference": "1",
            "answer": "1" if c else None,
            "correct": c,
            "finish": "stop",
            **({"gold_nll": nll_per_token * 10, "gold_tokens": 10} if nll_per_token else {}),
        }
        for i, c in enumerate(correct)
    ]
    result = {"benchmark": "gsm8k", "n": len(items), "items": items, "max_tokens": 256}
    return {"version": version, "step": "dpo", "metrics": {}, "eval": result}


def test_the_solver_goal_is_a_paired_comparison_and_a_tie_is_no_evidence():
    """0/20 against 0/20 (the README run's figures) is no evidence of anything: the goal is
    missed and never reads "not below"; 9 items won and none lost is the last version better."""
    rows = loop.solver_goals([_solver(0, [False] * 20, 2.0), _solver(5, [False] * 20, 2.0)])
    assert [r["value"]["verdict"] for r in rows] == ["no evidence of a difference"] * 2
    assert [r["ok"] for r in rows] == [False, False]
    assert rows[0]["value"]["p"] == 1.0 and rows[0]["value"]["interval"] == [0.0, 0.0]
    assert not any("not below" in f"{r['name']} {r['goal']}" for r in rows)
    better = loop.solver_goals(
        [_solver(0, [False] * 20, 2.0), _solver(7, [True] * 9 + [False] * 11, 1.5)]
    )
    assert [(r["value"]["verdict"], r["ok"]) for r in better] == [("last better", True)] * 2
    assert "v7" in better[0]["name"] and "paired on 20 items" in better[0]["name"]
    assert better[0]["value"]["p"] == 2 / 2**9
    alone = loop.solver_goals([_solver(0, [False] * 20)])  # no version past the base
    assert [r["ok"] for r in alone] == [False, False] and alone[0]["value"] is None
