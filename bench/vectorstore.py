"""Vector store benchmark: prints figures, measured side by side on this machine.

    /work/venv/bin/python bench/vectorstore.py [--sizes 10000 100000] [--filter-texts 640]

1. Lookup latency (p50/p99) of ProblemStore.nearest at each size: one query per call, and a
   batch of 32 queries per call; brute force vs the ANN index (goal: p99 <= 10 ms at 100k).
   Stored vectors are random unit vectors; queries are stored vectors plus noise (cosine ~0.9,
   a near-duplicate), so recall@1 = the query finds the vector it was made from.
2. Filter-stage throughput: embed_and_screen + decide_and_commit on GSM8K train problems in
   micro-batches of 32,
   vs raw Embedder.embed on the same texts and batch size (ratio = filter / embed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# This script shares its name with the package it measures: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np

from vectorstore.settings import DecontamSettings, StoreSettings
from vectorstore.store import ProblemStore, StoredProblem

DIM = 384


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def fill(store: ProblemStore, vectors: np.ndarray, batch: int = 10_000) -> float:
    started = time.perf_counter()
    for start in range(0, len(vectors), batch):
        store.add(
            [
                StoredProblem(f"p{i}", "", f"{i:032x}", "math", vectors[i])
                for i in range(start, min(start + batch, len(vectors)))
            ]
        )
    return time.perf_counter() - started


def latency(store: ProblemStore, queries: np.ndarray, per_call: int) -> tuple[float, float, float]:
    """p50 ms, p99 ms per call, and recall@1 (query i was made from stored vector i)."""
    times, hits = [], 0
    for start in range(0, len(queries), per_call):
        chunk = queries[start : start + per_call]
        t = time.perf_counter()
        found = store.nearest(chunk, k=1)
        times.append((time.perf_counter() - t) * 1000)
        hits += sum(1 for j, n in enumerate(found) if n and n[0][0] == f"p{start + j}")
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), hits / len(queries)


def lookup_bench(sizes: list[int], root: Path) -> None:
    rng = np.random.default_rng(0)
    print("## lookup latency (ms per nearest() call, k=1)")
    print(f"{'rows':>7} {'mode':>12} {'queries/call':>12} {'p50':>7} {'p99':>7} {'recall@1':>8}")
    for size in sizes:
        vectors = unit(rng.standard_normal((size, DIM)))
        noise = unit(rng.standard_normal((400, DIM)))
        queries = unit(vectors[:400] + 0.48 * noise)  # cosine ~0.9 to the source vector
        # Never-indexed store (brute force) and an indexed one, same data.
        brute = ProblemStore(
            DIM,
            StoreSettings(
                uri=str(root / f"brute{size}"), index_min_rows=10**12, optimize_every_writes=10**9
            ),
        )
        fill(brute, vectors)
        brute.optimize()
        indexed = ProblemStore(
            DIM,
            StoreSettings(
                uri=str(root / f"ann{size}"), index_min_rows=size, optimize_every_writes=10**9
            ),
        )
        t = time.perf_counter()
        fill(indexed, vectors)
        indexed.optimize()
        build_s = time.perf_counter() - t
        assert indexed.has_vector_index
        for name, store in (("brute", brute), ("IVF_HNSW_SQ", indexed)):
            store.nearest(queries[:8])  # warm caches
            for per_call in (1, 32):
                p50, p99, recall = latency(store, queries, per_call)
                print(f"{size:>7} {name:>12} {per_call:>12} {p50:>7.2f} {p99:>7.2f} {recall:>8.3f}")
        t = time.perf_counter()
        for start in range(0, 320, 32):
            indexed.ids_by_hash([f"{i:032x}" for i in range(start, start + 32)])
        print(
            f"{size:>7} exact-hash lookup, 32 hashes/call: "
            f"{(time.perf_counter() - t) / 10 * 1000:.2f} ms"
            f" | fill+index build {build_s:.1f} s"
        )


def filter_bench(n_texts: int, root: Path) -> None:
    from vectorstore.calibrate import load_gsm8k
    from vectorstore.decontam import ContaminationIndex
    from vectorstore.dedup import CandidateText, DedupFilter
    from vectorstore.embedder import Embedder

    texts = load_gsm8k("train")[:n_texts]
    embedder = Embedder()
    t = time.perf_counter()
    contamination = ContaminationIndex.from_settings(embedder, DecontamSettings(cache_dir=None))
    print(f"\n## filter stage ({n_texts} GSM8K train problems, micro-batches of 32)")
    print(
        "contamination index build (2.2k benchmark items, embed + n-grams): "
        f"{time.perf_counter() - t:.1f} s"
    )
    embedder.embed(texts[:32])  # warm up
    store = ProblemStore(embedder.dim, StoreSettings(uri=str(root / "filter")))
    dedup = DedupFilter(embedder, contamination, store)
    items = [CandidateText(f"c{i}", text, "math") for i, text in enumerate(texts)]
    # Interleaved batch by batch, so both sides see the same machine load (shared cores).
    embed_s = screen_s = decide_s = 0.0
    accepted = 0
    for start in range(0, len(items), 32):
        t0 = time.perf_counter()
        embedder.embed(texts[start : start + 32])
        t1 = time.perf_counter()
        screened = dedup.embed_and_screen(items[start : start + 32])
        t2 = time.perf_counter()
        accepted += sum(x.accepted for x in dedup.decide_and_commit(screened))
        t3 = time.perf_counter()
        embed_s, screen_s, decide_s = embed_s + t1 - t0, screen_s + t2 - t1, decide_s + t3 - t2
    embed_rate = len(texts) / embed_s
    filter_rate = len(items) / (screen_s + decide_s)
    print(f"raw embedding:  {embed_rate:7.1f} texts/s")
    print(
        f"filter (check): {filter_rate:7.1f} candidates/s  "
        f"ratio filter/embed = {filter_rate / embed_rate:.2f}"
    )
    print(
        f"  embed_and_screen {screen_s:.1f} s ({len(items) / screen_s:.0f}/s), "
        f"decide_and_commit {decide_s:.2f} s ({len(items) / decide_s:.0f}/s, owner-only part)"
    )
    print(f"  accepted {accepted}/{len(items)}, stored {store.count()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--filter-texts", type=int, default=640)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vectorstore-bench-"))
    try:
        lookup_bench(args.sizes, root)
        if args.filter_texts:
            filter_bench(args.filter_texts, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
