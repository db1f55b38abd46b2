"""Sandbox cost vs a plain subprocess, on the same programs and tests, measured side by side.

Modes, each running every solution against all its tests:
  plain        one plain `python3 -S prog.py` subprocess per test (no isolation): the baseline
  per-test     one sandboxed process per test (Sandbox.run)
  shared       all tests of a solution in one sandboxed process (Sandbox.run_tests)
Goal: shared <= 1.5x plain per solution.

Usage: /work/venv/bin/python bench/sandbox.py [--solutions 6] [--tests 10] [--slots 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.sandbox import Limits, ProgramTest, Sandbox, SandboxSettings

ROOT = Path(__file__).resolve().parents[1]
CODEFORCES = ROOT / "workers/data/benchmarks/codeforces.jsonl"

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
            out = subprocess.run([python, "-S", f.name], input=test.input, capture_output=True,
                                 timeout=10, check=False).stdout
            ok &= out.split() == (test.output or b"").split()
        return ok


def per_test(sb: Sandbox, program: str, tests: list[ProgramTest]) -> bool:
    ok = True
    for test in tests:
        result = sb.run(program, test.input)
        if result.stdout.split() != (test.output or b"").split():
            print("per-test mismatch:", result, file=sys.stderr)
            ok = False
    return ok


def shared(sb: Sandbox, program: str, tests: list[ProgramTest]) -> bool:
    outcomes = sb.run_tests(program, tests)
    for outcome in outcomes:
        if not outcome.passed:
            print("shared mismatch:", outcome, file=sys.stderr)
    return all(o.passed for o in outcomes)


def timed(fn, jobs, workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: fn(*job), jobs))
    elapsed = time.perf_counter() - start
    assert all(results), f"{fn.__name__}: a correct solution failed"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--solutions", type=int, default=6)
    parser.add_argument("--tests", type=int, default=10, help="tests per solution")
    parser.add_argument("--slots", type=int, default=1, help="parallel runs (and sandbox slots)")
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds per mode")
    args = parser.parse_args()

    sb = Sandbox(SandboxSettings(slots=args.slots, limits=Limits()))
    rows = list(PROGRAMS)
    jobs_for = {row: load_tests(row, args.tests) for row in rows}
    solutions = [(PROGRAMS[rows[i % len(rows)]], jobs_for[rows[i % len(rows)]])
                 for i in range(args.solutions)]
    modes = {
        "plain": lambda p, t: plain(sb.python, p, t),
        "per-test": lambda p, t: per_test(sb, p, t),
        "shared": lambda p, t: shared(sb, p, t),
    }
    # warm-up, then interleave modes per round so machine load hits them alike
    for fn in modes.values():
        fn(*solutions[0])
    best = {name: float("inf") for name in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            fn.__name__ = name
            best[name] = min(best[name], timed(fn, solutions, args.slots))

    n_runs = args.solutions * args.tests
    print(f"backend={sb.backend} python={sb.python} solutions={args.solutions} "
          f"tests/solution={args.tests} slots={args.slots} (best of {args.rounds})")
    print(f"{'mode':<10} {'total s':>8} {'runs/s':>8} {'ms/solution':>12} {'ms/test':>8} "
          f"{'x plain':>8}")
    for name, elapsed in best.items():
        print(f"{name:<10} {elapsed:>8.2f} {n_runs / elapsed:>8.1f} "
              f"{1000 * elapsed / args.solutions * args.slots:>12.1f} "
              f"{1000 * elapsed / n_runs * args.slots:>8.1f} {elapsed / best['plain']:>8.2f}")
    overhead = (best["shared"] - best["plain"]) / args.solutions * args.slots * 1000
    print(f"shared-process overhead per solution: {overhead:+.1f} ms; "
          f"shared/plain = {best['shared'] / best['plain']:.2f}x (goal <= 1.5x)")
    sb.close()


if __name__ == "__main__":
    main()
