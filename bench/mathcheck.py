"""Equivalence throughput of the math-verify worker (warm), on reformatted GSM8K gold answers.

    /work/venv/bin/python bench/mathcheck.py [--rows 300]

Every pair is distinct and needs math-verify (no exact fast path), so the figure includes the
worker's parse of both sides plus the IPC; the extraction share over the whole test split is
printed too, and the round trip to the worker for a pair it has already parsed.
"""

from __future__ import annotations

import argparse
import json
import time

import corpora
from workers.mathcheck import (
    EquivalenceOracle,
    MathCheckSettings,
    extract_answer,
    normalize_answer,
)

GSM8K = corpora.path("gsm8k", "test.jsonl")


def worker_pairs(gold: str) -> list[tuple[str, str]]:
    """Forms the exact fast path cannot decide (they need math-verify)."""
    g = int(gold.replace(",", ""))
    return [
        (gold, f"{g}\\text{{ dollars}}"),
        (gold, f"\\${g}"),
        (gold, f"{g} + 0"),
        (gold, f"{g + 1}\\text{{ dollars}}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]

    t0 = time.perf_counter()
    hits = sum(
        normalize_answer(extract_answer(r["answer"]) or "") == normalize_answer(g)
        for r, g in zip(rows, golds, strict=True)
    )
    t_extract = time.perf_counter() - t0
    print(
        f"extraction: {hits}/{len(rows)} = {hits / len(rows):.4f} "
        f"({len(rows) / t_extract:.0f} rows/s)"
    )

    pairs = [p for g in golds[: args.rows] for p in worker_pairs(g)]
    with EquivalenceOracle() as oracle:
        oracle.equivalent("1", "1 + 0")  # start + warm the worker outside the timing
        t0 = time.perf_counter()
        verdicts = oracle.equivalent_many(pairs)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        oracle.equivalent_many(pairs)
        cached = time.perf_counter() - t0
    expected = [True, True, True, False] * (len(pairs) // 4)
    wrong = sum(v != e for v, e in zip(verdicts, expected, strict=True))
    print(
        f"equivalence (warm worker, distinct pairs): {len(pairs)} pairs in {cold:.2f} s = "
        f"{len(pairs) / cold:.0f} pairs/s; wrong verdicts: {wrong}; timeouts: {oracle.timeouts}"
    )
    print(f"equivalence (cache hits): {len(pairs) / cached:.0f} pairs/s")

    one_by_one = pairs[:200]
    with EquivalenceOracle() as oracle:
        oracle.equivalent("1", "1 + 0")
        t0 = time.perf_counter()
        for a, b in one_by_one:
            oracle.equivalent(a, b)
        single = time.perf_counter() - t0
    print(f"equivalence one call per pair: {len(one_by_one) / single:.0f} pairs/s")

    # The same pair again and again without the oracle's cache: the worker has it parsed, so
    # this is the cost of one trip to the worker process (verify on parsed input + IPC).
    with EquivalenceOracle(MathCheckSettings(cache_size=0)) as oracle:
        a, b = pairs[0]
        oracle.equivalent(a, b)
        trips = []
        for _ in range(500):
            t0 = time.perf_counter()
            oracle.equivalent(a, b)
            trips.append(time.perf_counter() - t0)
    trips.sort()
    print(
        f"worker round trip (parsed pair, no cache): median {trips[250] * 1e3:.3f} ms, "
        f"p90 {trips[450] * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
