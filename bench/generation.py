"""Generation throughput of a backend: micro-batched (batch 16) vs one prompt at a time.

    python bench/generation.py                      # the tiny test model
    python bench/generation.py --smollm2            # also SmolLM2-135M (prepared on demand)
    python bench/generation.py --json out.json

Each case is a named function returning a result dict, so further comparisons (e.g. the
streaming stage vs direct calls) are added as another entry in CASES.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from workers import prompts as P
from workers.backends import Backend, BackendSettings, make_backend


def bench_prompts(backend: Backend, count: int) -> list[str]:
    """Synthesis prompts with varied concept sets: the generate stage's real workload."""
    concept_pool = ["addition of whole numbers", "equal groups", "counting objects",
                    "division as equal sharing", "units of quantity", "whole numbers"]
    out = []
    for i in range(count):
        concepts = [concept_pool[(i + j) % len(concept_pool)] for j in range(3)]
        out.append(P.SYNTHESIS.render(backend, **P.synthesis_fields(concepts, "AIME", "math")))
    return out


def run_generation(backend: Backend, prompts: list[str], batch: int, max_tokens: int) -> dict:
    """Tokens/s generating ``prompts`` in calls of ``batch`` prompts (temperature 0.8)."""
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        for item in backend.generate(prompts[i : i + batch], temperature=0.8, top_p=0.95,
                                     max_tokens=max_tokens, seed=i):
            tokens += sum(c.n_completion_tokens for c in item)
    seconds = time.perf_counter() - started
    return {"batch": batch, "prompts": len(prompts), "completion_tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def case_batched_vs_single(backend: Backend, n_prompts: int, max_tokens: int) -> dict:
    prompts = bench_prompts(backend, n_prompts)
    backend.generate(prompts[:2], max_tokens=4)  # warm-up
    single = run_generation(backend, prompts, 1, max_tokens)
    batched = run_generation(backend, prompts, 16, max_tokens)
    return {"single": single, "batched16": batched,
            "speedup": round(batched["tokens_per_s"] / max(single["tokens_per_s"], 1e-9), 2)}


CASES: dict[str, Callable[[Backend, int, int], dict]] = {
    "batched_vs_single": case_batched_vs_single,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also bench SmolLM2-135M")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    from tiny_model import tiny_model_dir

    models = {"tiny": tiny_model_dir()}
    if args.smollm2:
        from workers.models import prepare_smollm2

        models["smollm2-135m"] = prepare_smollm2()
    results: dict[str, dict] = {}
    for label, path in models.items():
        backend = make_backend(BackendSettings(kind="transformers", model=str(path),
                                               max_batch_size=16))
        for name in args.case or sorted(CASES):
            result = CASES[name](backend, args.prompts, args.max_tokens)
            results[f"{label}/{name}"] = result
            print(f"{label}/{name}: {json.dumps(result)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
