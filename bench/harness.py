"""The benchmark harness: the case list, rows, statistics, the table, JSON files and comparison.

A case is a module of this package with ``measure(quick: bool = False) -> list[dict]``; each dict
is one figure: {"case", "name", "value", "unit", "goal", "ok"} and, for timings, "spread" (the
[min, max] of the runs whose median is "value") and "runs". "goal" is a text such as ">= 0.9x"
(None: a figure shown for context), "ok" whether the figure meets it (None without a goal).
A figure that could not be measured has value None and says why in "name" ("not run: ...").

Each case runs in its own process (``python -m bench --one NAME``): cases load different
models, set process-wide torch threads and metrics, and one crashing must not take the table
with it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

Row = dict[str, Any]


@dataclass(frozen=True)
class Case:
    name: str
    module: str  # bench.<module>
    doc: str
    default: bool = True  # run without --case


CASES: tuple[Case, ...] = (
    Case(
        "saturation",
        "saturation",
        "generate stage vs the same prompts sent straight to a "
        "loopback server: throughput and requests in flight",
    ),
    Case(
        "saturation_vllm",
        "saturation_vllm",
        "the vLLM backend from many threads vs one offline vLLM call (needs the vLLM venv)",
    ),
    Case("plumbing", "plumbing", "an echo stage end to end through the embedded broker"),
    Case("broker", "broker", "durable vs in-memory embedded broker: produce and consume"),
    Case("scaleout", "scaleout", "1 vs 2 worker processes of a latency-bound stage"),
    Case("generation", "generation", "transformers: batched vs single, stage vs direct"),
    Case("sandbox", "sandbox", "sandboxed runs vs plain subprocesses"),
    Case("mathcheck", "mathcheck", "answer extraction and equivalence throughput"),
    Case("budgets", "budgets", "decode budgets against the cold-start rationales' token lengths"),
    Case("vectorstore", "vectorstore", "nearest-neighbour lookup latency and recall"),
    Case("trainer", "trainer", "the trainer's windows on the cpu profile, DPO beside TRL's"),
    Case(
        "memory",
        "memory",
        "resident memory by component, and its curve over `promptcot up` runs (long: only with "
        "--case memory; --duration, --runs)",
        False,
    ),
    Case("loop", "loop", "the training-loop experiment (long: only with --case loop)", False),
    Case(
        "experiment",
        "experiment",
        "the experiment with controls: solver and EM arms on one step budget "
        "(long: only with --case experiment)",
        False,
    ),
)
BY_NAME = {c.name: c for c in CASES}


# -- rows and statistics ------------------------------------------------------------------------


def row(
    case: str,
    name: str,
    value: float | None,
    unit: str,
    goal: str | None = None,
    ok: bool | None = None,
    runs: Iterable[float] | None = None,
) -> Row:
    out: Row = {"case": case, "name": name, "value": value, "unit": unit, "goal": goal, "ok": ok}
    if runs is not None:
        runs = list(runs)
        out["spread"] = [min(runs), max(runs)]
        out["runs"] = len(runs)
    return out


def timing(
    case: str,
    name: str,
    runs: Iterable[float],
    unit: str,
    at_least: float | None = None,
    at_most: float | None = None,
) -> Row:
    """The median of ``runs`` with their spread, checked against a bound if one is given."""
    runs = list(runs)
    value = statistics.median(runs)
    goal, ok = None, None
    if at_least is not None:
        goal, ok = f">= {at_least:g}{_goal_unit(unit)}", value >= at_least
    elif at_most is not None:
        goal, ok = f"<= {at_most:g}{_goal_unit(unit)}", value <= at_most
    return row(case, name, value, unit, goal, ok, runs)


def _goal_unit(unit: str) -> str:
    return unit if unit in ("x", "%") else f" {unit}"


def not_run(case: str, reason: str) -> Row:
    return row(case, f"not run: {reason}", None, "")


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Run-by-run ratios of side-by-side measurements."""
    return [a / b if b else float("nan") for a, b in zip(numerators, denominators, strict=True)]


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- running cases ------------------------------------------------------------------------------


def measure_case(case: Case, quick: bool, **options: Any) -> list[Row]:
    """Run one case in this process. ``options`` (``duration_s``, ``runs``: the command line's
    --duration and --runs) go to the cases whose ``measure`` takes them."""
    if not (ROOT / "bench" / f"{case.module}.py").is_file():
        return [not_run(case.name, f"bench/{case.module}.py is not in this checkout")]
    module = importlib.import_module(f"bench.{case.module}")
    measure: Callable[..., list[Row]] | None = getattr(module, "measure", None)
    if measure is not None:
        takes = inspect.signature(measure).parameters
        given = {k: v for k, v in options.items() if v is not None and k in takes}
        return list(measure(quick=quick, **given))
    return [not_run(case.name, f"bench/{case.module}.py has no measure()")]


def run_case_process(
    case: Case, quick: bool, duration: str | None = None, runs: int | None = None
) -> list[Row]:
    """Run one case in a child process; its errors become a row."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="bench-") as out:
        argv = [sys.executable, "-m", "bench", "--one", case.name, "--out", out.name]
        if quick:
            argv.append("--quick")
        if duration is not None:
            argv += ["--duration", duration]
        if runs is not None:
            argv += ["--runs", str(runs)]
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, env=_child_env(), check=False)
        seconds = time.perf_counter() - started
        text = Path(out.name).read_text()
    if proc.returncode != 0 or not text.strip():
        return [not_run(case.name, f"the case failed (exit {proc.returncode}); see its output")]
    rows = json.loads(text)["rows"]
    print(f"[bench] {case.name}: {len(rows)} figures in {seconds:.0f} s", file=sys.stderr)
    return rows


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def selected(names: list[str] | None) -> list[Case]:
    if not names:
        return [c for c in CASES if c.default]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown case {', '.join(unknown)}; cases: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def skipped_rows(names: list[str] | None) -> list[Row]:
    """Rows that say which cases a default run leaves out, and how to run them."""
    if names:
        return []
    return [not_run(c.name, f"long; run it with --case {c.name}") for c in CASES if not c.default]


def meta(quick: bool) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m": load_average(),
        "quick": quick,
    }


def write(path: Path, rows: list[Row], info: dict[str, Any]) -> None:
    path.write_text(json.dumps({"meta": info, "rows": rows}, indent=1, default=float))


# -- printing -----------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ok(r: Row) -> str:
    if r.get("value") is None:
        return ""
    return {True: "yes", False: "NO", None: ""}[r.get("ok")]


def table(rows: list[Row]) -> str:
    header = ("case", "figure", "value", "unit", "spread (runs)", "goal", "holds")
    lines = [header]
    for r in rows:
        spread = ""
        if r.get("spread"):
            lo, hi = r["spread"]
            spread = f"{fmt(lo)}..{fmt(hi)} ({r.get('runs', '?')})"
        lines.append(
            (
                str(r["case"]),
                str(r["name"]),
                fmt(r.get("value")),
                str(r.get("unit") or ""),
                spread,
                str(r.get("goal") or "-") if r.get("value") is not None else "",
                _ok(r),
            )
        )
    return _columns(lines, right={2})


def summary(rows: list[Row]) -> str:
    with_goal = [r for r in rows if r.get("goal") and r.get("value") is not None]
    held = sum(1 for r in with_goal if r.get("ok"))
    missing = sum(1 for r in rows if r.get("value") is None)
    return f"{held} of {len(with_goal)} goals hold; {missing} figures not measured"


def compare(a_path: Path, b_path: Path) -> str:
    """Two result files side by side, matched by (case, figure), with B / A."""
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    index_a = {(r["case"], r["name"]): r for r in a["rows"]}
    index_b = {(r["case"], r["name"]): r for r in b["rows"]}
    keys = list(index_a) + [k for k in index_b if k not in index_a]
    lines = [("case", "figure", "A", "B", "B/A", "unit", "goal", "A holds", "B holds")]
    for key in keys:
        ra, rb = index_a.get(key, {}), index_b.get(key, {})
        va, vb = ra.get("value"), rb.get("value")
        ratio = fmt(vb / va) if va and vb is not None else "-"
        lines.append(
            (
                key[0],
                key[1],
                fmt(va),
                fmt(vb),
                ratio,
                str(ra.get("unit") or rb.get("unit") or ""),
                str(ra.get("goal") or rb.get("goal") or "-"),
                _ok(ra) if ra else "",
                _ok(rb) if rb else "",
            )
        )
    head = [
        f"A: {a_path} ({a['meta'].get('when')}, {a['meta'].get('commit')}, "
        f"load {a['meta'].get('load_average_1m')})",
        f"B: {b_path} ({b['meta'].get('when')}, {b['meta'].get('commit')}, "
        f"load {b['meta'].get('load_average_1m')})",
    ]
    return "\n".join([*head, _columns(lines, right={2, 3, 4})])


def _columns(lines: list[tuple[str, ...]], right: set[int]) -> str:
    """Aligned columns; the first line is the header, underlined."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for k, line in enumerate(lines):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        ]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
