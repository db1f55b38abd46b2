"""``python -m bench``: run the benchmark cases and print every figure beside its goal.

    python -m bench                         # every default case (minutes to an hour)
    python -m bench --quick                 # smaller runs: checks that everything runs
    python -m bench --case saturation --case plumbing --out after.json
    python -m bench --case memory --duration 25m --runs 1   # the README run's memory
    python -m bench --compare before.json after.json
    python -m bench --list

Figures are medians of >= 3 runs with their spread where they are timings, and every
comparison is measured side by side in one run (interleaved), so load on a shared machine hits
both sides alike. Cases: bench/harness.py (CASES).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", metavar="NAME", help="run only this case")
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--list", action="store_true", help="list the cases")
    parser.add_argument(
        "--duration", help="length of the live run of the cases that have one (memory, loop)"
    )
    parser.add_argument("--runs", type=int, help="runs of the cases that take a count (memory)")
    parser.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    from promptcot.cli.app import parse_duration

    if args.duration:
        parse_duration(args.duration)  # a bad value fails here, not in a child

    if args.compare:
        print(harness.compare(*args.compare))
        return 0
    if args.list:
        for case in harness.CASES:
            print(f"{case.name:<16} {case.doc}{'' if case.default else ' [not by default]'}")
        return 0
    if args.one:
        rows = harness.measure_case(
            harness.BY_NAME[args.one],
            args.quick,
            duration_s=parse_duration(args.duration) if args.duration else None,
            runs=args.runs,
        )
        if args.out:
            harness.write(args.out, rows, harness.meta(args.quick))
        return 0

    info = harness.meta(args.quick)
    rows: list[dict] = []
    for case in harness.selected(args.case):
        print(f"[bench] {case.name}: {case.doc}", file=sys.stderr, flush=True)
        rows += harness.run_case_process(case, args.quick, args.duration, args.runs)
        if args.out:  # after every case: a long run that dies keeps what it measured
            harness.write(args.out, rows, info)
    rows += harness.skipped_rows(args.case)
    info["load_average_1m_end"] = harness.load_average()
    print(harness.table(rows))
    print(harness.summary(rows))
    if args.out:
        harness.write(args.out, rows, info)
        print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
