"""Sandbox cost vs a plain subprocess, on the same programs and tests, measured side by side.

Modes, each running every solution against all its tests:
  plain      one plain `python3 -S prog.py` subprocess per test (no isolation): the baseline
  per-test   one sandboxed run per test (Sandbox.run)
  shared     all tests of a solution in one sandboxed request (Sandbox.run_tests)
Goal: shared <= 1.5x plain per solution. Each round times every mode once, interleaved, so
machine load hits them alike; figures are the median over rounds, with the spread.

The breakdown times each piece of a sandbox start on its own (difference of medians over many
interleaved runs in shuffled order): the exec chain links, bwrap with the old (--ro-bind / /)
and the interpreter-only view, the harness start, and what a solution costs on top of its
programs once a slot's zygote runs.

measure(quick) returns the figures for the project's benchmark harness; run as a script it
prints them as a table:
  python bench/sandbox.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import corpora
from verification.sandbox import Limits, ProgramTest, Sandbox, SandboxSettings
from verification.sandbox.harness import frame
from verification.sandbox.runner import HARNESS_SOURCE

CODEFORCES = corpora.path("benchmarks", "codeforces.jsonl")
GOAL = 1.5

PROGRAMS = {
    0: "t = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n"
    "    print(min(x, y), max(x, y))\n",
    3: "t = int(input())\nfor _ in range(t):\n    s = input().strip()\n"
    "    print(1 + sum(a != b for a, b in zip(s, s[1:])) - ('01' in s))\n",
}


def load_tests(row: int, count: int) -> list[ProgramTest]:
    with CODEFORCES.open() as f:
        line = f.readlines()[row]
    io = json.loads(json.loads(line)["input_output"])
    shipped = [ProgramTest(a.encode(), b.encode()) for a, b in zip(io["inputs"], io["outputs"])]
    return [shipped[i % len(shipped)] for i in range(count)]  # repeat to `count` tests


def plain(python: str, program: str, tests: list[ProgramTest]) -> bool:
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(program)
        f.flush()
        ok = True
        for test in tests:
            out = subprocess.run(
                [python, "-S", f.name],
                input=test.input,
                capture_output=True,
                timeout=10,
                check=False,
            ).stdout
            ok &= out.split() == (test.output or b"").split()
        return ok


def per_test(sb: Sandbox, program: str, tests: list[ProgramTest]) -> bool:
    return all(sb.run(program, t.input).stdout.split() == (t.output or b"").split() for t in tests)


def shared(sb: Sandbox, program: str, tests: list[ProgramTest]) -> bool:
    return all(o.passed for o in sb.run_tests(program, tests))


def timed(
    fn: Callable[..., bool], jobs: list[tuple[str, list[ProgramTest]]], workers: int
) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: fn(*job), jobs))
    elapsed = time.perf_counter() - start
    assert all(results), f"{fn.__name__}: a correct solution failed"
    return elapsed


def row(
    case: str, name: str, value: float, unit: str, goal: str | None = None, ok: bool | None = None
) -> dict[str, object]:
    return {
        "case": case,
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "goal": goal,
        "ok": ok,
    }


def modes_side_by_side(
    slots: int, solutions: int, tests: int, rounds: int, with_per_test: bool
) -> list[dict[str, object]]:
    """Median over rounds of each sandboxed mode's time over plain's, measured side by side."""
    with Sandbox(SandboxSettings(slots=slots, limits=Limits())) as sb:
        jobs_for = {row_: load_tests(row_, tests) for row_ in PROGRAMS}
        rows = list(PROGRAMS)
        jobs = [
            (PROGRAMS[rows[i % len(rows)]], jobs_for[rows[i % len(rows)]]) for i in range(solutions)
        ]
        modes: dict[str, Callable[..., bool]] = {
            "plain": lambda p, t: plain(sb.python, p, t),
            "shared": lambda p, t: shared(sb, p, t),
        }
        if with_per_test:
            modes["per-test"] = lambda p, t: per_test(sb, p, t)
        for name, fn in modes.items():
            fn.__name__ = name
            timed(fn, jobs[:slots], slots)  # warm-up: page cache, and each slot's zygote
        times: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(rounds):
            for name, fn in modes.items():
                times[name].append(timed(fn, jobs, slots))
        backend = sb.backend
    out = []
    case = f"sandbox ({backend})"
    ratios = [s / p for s, p in zip(times["shared"], times["plain"], strict=True)]
    median = statistics.median(ratios)
    label = f"one process per solution vs plain subprocess, {slots} slot{'s' * (slots > 1)}"
    out.append(row(case, label, median, "x", f"<= {GOAL}x", median <= GOAL))
    out.append(row(case, label + ", spread over rounds", max(ratios) - min(ratios), "x"))
    overhead = [
        (s - p) / solutions * slots * 1000
        for s, p in zip(times["shared"], times["plain"], strict=True)
    ]
    out.append(
        row(
            case,
            f"overhead per solution, {slots} slot{'s' * (slots > 1)}",
            statistics.median(overhead),
            "ms",
        )
    )
    if with_per_test:
        per = [s / p for s, p in zip(times["per-test"], times["plain"], strict=True)]
        out.append(
            row(
                case,
                f"one process per test vs plain subprocess, {slots} slot{'s' * (slots > 1)}",
                statistics.median(per),
                "x",
            )
        )
    return out


def _run_ms(argv: list[str], stdin: bytes) -> float:
    start = time.perf_counter()
    subprocess.run(argv, input=stdin, capture_output=True, check=False, timeout=30)
    return (time.perf_counter() - start) * 1000


def breakdown(samples: int) -> list[dict[str, object]]:
    """What one sandbox start costs, piece by piece, each piece over its simplest baseline
    (root: the chain needs the slot uid)."""
    case = "sandbox start, per piece"
    with Sandbox(SandboxSettings(backend="bwrap", slots=1)) as sb:
        slot = sb._all_slots[0]
        python = sb.view.python
        bare = [python, "-S", "-c", "pass"]
        cgroup = [
            x
            for g in slot.cgroups
            for x in ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', g.procs_file]
        ]
        prlimit = ["prlimit", "--nproc=4096", "--core=0", "--nofile=256", "--"]
        setpriv = (
            [
                "setpriv",
                f"--reuid={slot.uid}",
                f"--regid={slot.uid}",
                "--clear-groups",
                "--no-new-privs",
                "--",
            ]
            if slot.uid is not None
            else []
        )
        old_view = [
            str(sb._bwrap),
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/tmp",
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--",
        ]
        command = sb._command("bwrap", slot)
        bwrap_at = command.index(str(sb._bwrap))
        new_view = command[bwrap_at : command.index("--", bwrap_at) + 1]
        nonce = b"0" * 32
        one_solution = frame(sb._init("bwrap", slot)) + frame(
            {
                "nonce": nonce,
                "salt": b"",
                "program": b"pass",
                "argv": bare[:2],
                "tests": [{"input": b"", "digest": None}],
                "wall": 5.0,
                "max_output": 1 << 20,
                "stderr_cap": 4096,
                "stop_on_failure": False,
                "rlimits": {},
                "tmp_size": 1 << 20,
                "shm_size": 1 << 20,
            }
        )
        runs = {
            "bare": (bare, b""),
            "cgroup": (cgroup + bare, b""),
            "prlimit": (prlimit + bare, b""),
            "setpriv": (setpriv + bare, b""),
            "old": (setpriv + old_view + bare, b""),
            "new": (setpriv + new_view + bare, b""),
            "harness": (
                [python, "-S", "-c", HARNESS_SOURCE],
                frame(
                    {"kind": "none", "scratch": "/", "tmp_size": 1, "shm_size": 1, "devices": []}
                ),
            ),
            # the design before the zygote: all of it, for a solution running `pass` once
            "sandbox per solution": (command, one_solution),
        }
        sb.run("pass")  # the zygote is up
        samples_ms: list[dict[str, float]] = []
        order = [*runs, "zygote"]
        shuffle = random.Random(12).shuffle
        for _ in range(samples):
            # every piece once per sample, interleaved, in a new order each time: load drifts
            # hit every piece alike, and so does the slower run right after a sandbox's teardown
            shuffle(order)
            sample = {}
            for name in order:
                if name == "zygote":
                    start = time.perf_counter()
                    sb.run("pass")
                    sample[name] = (time.perf_counter() - start) * 1000
                else:
                    sample[name] = _run_ms(*runs[name])
            samples_ms.append(sample)

    def median(name: str) -> float:
        return statistics.median(x[name] for x in samples_ms)

    def over(a: str, b: str) -> float:
        """Difference of the medians (the times are heavy-tailed on a busy machine: a median of
        per-sample differences would not be the difference of the typical costs)."""
        return median(a) - median(b)

    return [
        row(case, "python -S start (plain subprocess)", median("bare"), "ms"),
        row(
            case,
            f"cgroup join ({len(slot.cgroups)} sh exec + cgroup.procs write)",
            over("cgroup", "bare"),
            "ms",
        ),
        row(case, "prlimit exec", over("prlimit", "bare"), "ms"),
        row(case, "setpriv exec (privilege drop)", over("setpriv", "bare"), "ms"),
        row(case, "bwrap set-up, old view (--ro-bind / /)", over("old", "setpriv"), "ms"),
        row(
            case, "bwrap set-up, interpreter-only view, zygote flags", over("new", "setpriv"), "ms"
        ),
        row(case, "harness start over a bare interpreter", over("harness", "bare"), "ms"),
        row(
            case,
            "a sandbox per solution (chain + bwrap + harness + its namespaces), over a "
            "bare interpreter",
            over("sandbox per solution", "bare"),
            "ms",
        ),
        row(
            case,
            "per solution with the zygote (fork, namespaces, tmpfs, /proc, host round "
            "trip), over a bare interpreter",
            over("zygote", "bare"),
            "ms",
        ),
    ]


def measure(quick: bool = False) -> list[dict[str, object]]:
    """Figures for the benchmark harness: each {"case", "name", "value", "unit", "goal", "ok"}.
    Median of >= 3 rounds; quick uses fewer solutions, tests and samples."""
    rounds = 3 if quick else 5
    solutions, tests = (2, 5) if quick else (6, 10)
    out = modes_side_by_side(1, solutions, tests, rounds, with_per_test=not quick)
    out += modes_side_by_side(
        2, 2 * solutions if quick else solutions, tests, rounds, with_per_test=False
    )
    out += breakdown(samples=9 if quick else 60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print measure()'s rows as JSON")
    args = parser.parse_args()
    rows = measure(quick=args.quick)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'case':<28} {'name':<92} {'value':>8} {'unit':<4} {'goal':<8} ok")
    for r in rows:
        ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        print(
            f"{r['case']:<28} {r['name']:<92} {r['value']:>8.2f} {r['unit']:<4} "
            f"{r['goal'] or '':<8} {ok}"
        )


if __name__ == "__main__":
    main()
