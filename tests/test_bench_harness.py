"""The benchmark harness (bench/harness.py): figures carry their goal and whether it holds, a case
that is missing or fails becomes a "not run" row instead of sinking the table, and two result
files compare side by side."""

from __future__ import annotations

import json

from bench import harness


def test_timing_is_the_median_with_its_spread_and_goal():
    r = harness.timing("c", "rate", [3.0, 1.0, 2.0], "records/s", at_least=2.5)
    assert r["value"] == 2.0 and r["spread"] == [1.0, 3.0] and r["runs"] == 3
    assert r["goal"] == ">= 2.5 records/s" and r["ok"] is False
    assert harness.timing("c", "ratio", [0.8, 1.2, 1.0], "x", at_most=1.5)["ok"] is True
    assert harness.timing("c", "context", [1.0], "ms")["goal"] is None


def test_table_shows_goals_and_unmeasured_figures():
    rows = [
        harness.timing("sat", "stage / direct", [0.5, 0.4, 0.6], "x", at_least=0.9),
        harness.not_run("vllm", "no venv"),
    ]
    text = harness.table(rows)
    assert ">= 0.9x" in text and "NO" in text and "not run: no venv" in text
    assert harness.summary(rows) == "0 of 1 goals hold; 1 figures not measured"


def test_a_missing_case_module_is_a_not_run_row():
    case = harness.Case("ghost", "no_such_module", "nothing")
    [r] = harness.measure_case(case, quick=True)
    assert r["value"] is None and r["name"].startswith("not run: bench/no_such_module.py")


def test_the_long_cases_are_left_out_by_default_and_said_so():
    long = ["memory", "loop", "experiment"]
    assert not set(long) & {c.name for c in harness.selected(None)}
    assert [r["case"] for r in harness.skipped_rows(None)] == long
    assert [c.name for c in harness.selected(["loop"])] == ["loop"]
    assert [c.name for c in harness.selected(["experiment"])] == ["experiment"]


def test_compare_puts_two_runs_side_by_side(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    harness.write(a, [harness.row("sat", "rate", 10.0, "records/s", ">= 12", False)], {})
    harness.write(b, [harness.row("sat", "rate", 15.0, "records/s", ">= 12", True)], {})
    text = harness.compare(a, b)
    line = next(x for x in text.splitlines() if x.startswith("sat"))
    assert line.split()[2:5] == ["10.00", "15.00", "1.50"] and line.split()[-2:] == ["NO", "yes"]
    assert json.loads(a.read_text())["rows"][0]["value"] == 10.0
