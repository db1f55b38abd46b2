"""Math checking: answer extraction on GSM8K gold answers, equivalence throughput of the
math-verify worker (warm) on reformatted GSM8K gold answers, and the arithmetic check of the
designer's reference on GSM8K train's worked solutions and the cold-start rationales built from
them (verification/mathcheck/reference.py).

Every pair is distinct and needs math-verify (no exact fast path), so the figure includes the
worker's parse of both sides plus the IPC; the extraction share over the whole test split is
printed too, and the round trip to the worker for a pair it has already parsed.
"""

from __future__ import annotations

import json
import statistics
import time

import corpora
from bench.harness import Row, row, timing
from verification.mathcheck import (
    EquivalenceOracle,
    MathCheckSettings,
    extract_answer,
    normalize_answer,
)

CASE = "mathcheck"
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


def arithmetic_rows() -> list[Row]:
    """How often the arithmetic check flags GSM8K train's worked solutions (mostly GSM8K's own
    slips, docs/verification.md), and whether the designer references of the cold-start
    rationales are the gold answers."""
    from verification.mathcheck.reference import check_arithmetic, designer_reference
    from workers.annotation import annotate_from_seed, solution_steps
    from workers.seeds import load_seeds

    seeds = load_seeds("gsm8k", "train", 100_000)
    t0 = time.perf_counter()
    checked = [check_arithmetic("\n".join(solution_steps(s.solution or ""))) for s in seeds]
    rate = len(seeds) / (time.perf_counter() - t0)
    with_steps = [c for c in checked if c.checked]
    flagged = sum(not c.ok for c in with_steps)
    given = refused = wrong = 0
    for seed in seeds:
        try:
            rationale = annotate_from_seed(seed, 5)[1]
        except ValueError:
            continue
        got = designer_reference(rationale)
        if got.answer is None:
            refused += 1
        else:
            given += 1
            wrong += got.answer.replace(",", "") != seed.answer
    return [
        row(
            CASE,
            f"GSM8K train solutions with checked steps (of {len(seeds)})",
            len(with_steps),
            "n",
        ),
        row(CASE, "arithmetic steps checked", sum(c.checked for c in checked), "n"),
        row(
            CASE,
            "solutions flagged by the arithmetic check",
            flagged / len(with_steps),
            "",
            "<= 0.01",
            flagged / len(with_steps) <= 0.01,
        ),
        row(CASE, "arithmetic check", rate, "solutions/s"),
        row(CASE, "cold-start rationales with a designer reference", given, "n"),
        row(CASE, "cold-start rationales refused (designer_arithmetic)", refused, "n"),
        row(CASE, "designer references that are not the gold answer", wrong, "n", "0", wrong == 0),
    ]


def measure(quick: bool = False) -> list[Row]:
    rows_n, runs = (100, 3) if quick else (300, 3)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]

    t0 = time.perf_counter()
    hits = sum(
        normalize_answer(extract_answer(r["answer"]) or "") == normalize_answer(g)
        for r, g in zip(rows, golds, strict=True)
    )
    extract_rate = len(rows) / (time.perf_counter() - t0)

    # Distinct gold values only (GSM8K repeats answers): every pair is then distinct and none is
    # a cache hit of another.
    distinct = list(dict.fromkeys(golds))[:rows_n]
    pairs = [p for g in distinct for p in worker_pairs(g)]
    expected = [True, True, True, False] * (len(pairs) // 4)
    batch, cached, single, trips, wrong = [], [], [], [], 0
    for _ in range(runs):
        with EquivalenceOracle() as oracle:
            oracle.equivalent("1", "1 + 0")  # start + warm the worker outside the timing
            t0 = time.perf_counter()
            verdicts = oracle.equivalent_many(pairs)
            batch.append(len(pairs) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            oracle.equivalent_many(pairs)
            cached.append(len(pairs) / (time.perf_counter() - t0))
        wrong += sum(v != e for v, e in zip(verdicts, expected, strict=True))
        with EquivalenceOracle() as oracle:
            oracle.equivalent("1", "1 + 0")
            t0 = time.perf_counter()
            for a, b in pairs[:200]:
                oracle.equivalent(a, b)
            single.append(200 / (time.perf_counter() - t0))
        # The same pair again and again without the oracle's cache: the worker has it parsed,
        # so this is one trip to the worker process (verify on parsed input + IPC).
        with EquivalenceOracle(MathCheckSettings(cache_size=0)) as oracle:
            a, b = pairs[0]
            oracle.equivalent(a, b)
            times = []
            for _ in range(300):
                t0 = time.perf_counter()
                oracle.equivalent(a, b)
                times.append(time.perf_counter() - t0)
            trips.append(statistics.median(times) * 1000)
    return [
        row(
            CASE,
            f"GSM8K test gold answers extracted ({len(rows)})",
            hits / len(rows),
            "",
            ">= 0.99",
            hits / len(rows) >= 0.99,
        ),
        row(CASE, "answer extraction", extract_rate, "answers/s"),
        row(
            CASE,
            f"wrong equivalence verdicts ({len(pairs)} pairs x {runs} runs)",
            wrong,
            "",
            "0",
            wrong == 0,
        ),
        timing(CASE, "equivalence, distinct pairs in one batch (warm worker)", batch, "pairs/s"),
        timing(CASE, "equivalence, cache hits", cached, "pairs/s"),
        timing(CASE, "equivalence, one call per pair", single, "pairs/s"),
        timing(CASE, "worker round trip, parsed pair, no cache (median)", trips, "ms"),
        *arithmetic_rows(),
    ]
