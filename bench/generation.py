"""Generation throughput of a backend: micro-batched (batch 16) vs one prompt at a time.

    python bench/generation.py                      # the tiny test model
    python bench/generation.py --smollm2            # also SmolLM2-135M (prepared on demand)
    python bench/generation.py --json out.json
    python bench/generation.py --case stage_vs_direct   # the generate stage vs the bare backend

Each case is a named function returning a result dict; CASES lists them.

``stage_vs_direct`` (issue 3): tokens/s of ``GenerateStage.process`` on ConceptSet records
(tokens from the stage's own counter, promptcot_model_tokens_total{role="prompt_model",
kind="completion"}) against calling the same backend instance directly on the same rendered
prompts, in the same two phases (rationale up to its delimiter, then the problem after the
bridge) with the same max_tokens, stop strings, sampling and seeds, in the same micro-batches.
The ratio is the stage's overhead; the goal is stage >= 0.9x direct. Runs alternate
(direct, stage, direct, stage, ...) so drift on a shared machine hits both; best of each is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from workers.roles import Role


def bench_prompts(backend: Backend, count: int) -> list[str]:
    """Synthesis prompts with varied concept sets: the generate stage's real workload."""
    concept_pool = [
        "addition of whole numbers",
        "equal groups",
        "counting objects",
        "division as equal sharing",
        "units of quantity",
        "whole numbers",
    ]
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
        for item in backend.generate(
            prompts[i : i + batch], temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=i
        ):
            tokens += sum(c.n_completion_tokens for c in item)
    seconds = time.perf_counter() - started
    return {
        "batch": batch,
        "prompts": len(prompts),
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def case_batched_vs_single(backend: Backend, n_prompts: int, max_tokens: int) -> dict:
    prompts = bench_prompts(backend, n_prompts)
    backend.generate(prompts[:2], max_tokens=4)  # warm-up
    single = run_generation(backend, prompts, 1, max_tokens)
    batched = run_generation(backend, prompts, 16, max_tokens)
    return {
        "single": single,
        "batched16": batched,
        "speedup": round(batched["tokens_per_s"] / max(single["tokens_per_s"], 1e-9), 2),
    }


def stage_settings(model_path: str, max_tokens: int, batch: int):
    from promptcot.settings import Settings

    return Settings(
        models={
            "prompt_model": {"kind": "transformers", "model": model_path, "max_batch_size": 16}
        },
        metrics={"port": 0},
        generation={"max_rationale_tokens": max_tokens, "max_problem_tokens": max_tokens},
        stages={"generate": {"batch_size": batch}},
    )


def bench_concept_sets(count: int) -> list:
    from streams.records import ConceptSet

    concept_pool = [
        "addition of whole numbers",
        "equal groups",
        "counting objects",
        "division as equal sharing",
        "units of quantity",
        "whole numbers",
    ]
    return [
        ConceptSet(
            domain="math",
            difficulty="AIME",
            draw=f"bench:{i}",
            concepts=[concept_pool[(i + j) % len(concept_pool)] for j in range(3)],
        )
        for i in range(count)
    ]


def _completion_tokens() -> float:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value(
            "promptcot_model_tokens_total", {"role": "prompt_model", "kind": "completion"}
        )
        or 0.0
    )


def run_stage(stage, sets: list, batch: int) -> dict:
    """GenerateStage.process on micro-batches of ``batch`` concept sets, as the runtime calls it."""
    before = _completion_tokens()
    started = time.perf_counter()
    candidates = rejected = 0
    for i in range(0, len(sets), batch):
        for emit in stage.process(sets[i : i + batch]):
            if emit.topic.name == "candidates":
                candidates += 1
            else:
                rejected += 1
    seconds = time.perf_counter() - started
    tokens = int(_completion_tokens() - before)
    return {
        "concept_sets": len(sets),
        "candidates": candidates,
        "rejected": rejected,
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def run_direct(stage, sets: list, batch: int) -> dict:
    """The stage's two backend calls per micro-batch, made directly: same prompts, max_tokens,
    stop strings, sampling and seeds, nothing else (no records, no parsing, no metrics)."""
    from workers.stages.generate import BRIDGE, batch_seed

    backend, gen = stage.backend(Role.PROMPT_MODEL), stage.settings.generation

    def call(prompts: list[str], max_tokens: int, stop: list[str], seed: int) -> list:
        if not prompts:
            return []
        out = backend.generate(
            prompts,
            n=1,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
        )
        return [c[0] for c in out]

    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(sets), batch):
        chunk = sets[i : i + batch]
        prompts = [
            P.SYNTHESIS.render(backend, **P.synthesis_fields(cs.concepts, cs.difficulty, cs.domain))
            for cs in chunk
        ]
        seed = batch_seed(chunk)
        rationales = call(
            prompts, gen.max_rationale_tokens, [P.RATIONALE_CLOSE, P.PROBLEM_OPEN], seed
        )
        problems = call(
            [p + z.text.rstrip() + BRIDGE for p, z in zip(prompts, rationales) if z.ok],
            gen.max_problem_tokens,
            [P.PROBLEM_CLOSE],
            seed + 1,
        )
        tokens += sum(c.n_completion_tokens for c in (*rationales, *problems))
    seconds = time.perf_counter() - started
    return {
        "concept_sets": len(sets),
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def case_stage_vs_direct(
    backend: Backend, n_prompts: int, max_tokens: int, batch: int = 16, repeats: int = 2
) -> dict:
    from workers.stages.generate import GenerateStage

    stage = GenerateStage(stage_settings(backend.settings.model, max_tokens, batch))
    stage.ensure_ready()  # loads the model once; the direct calls use this same instance
    sets = bench_concept_sets(n_prompts)
    run_direct(stage, sets[:2], 2)  # warm-up
    direct_runs, stage_runs = [], []
    for _ in range(repeats):
        direct_runs.append(run_direct(stage, sets, batch))
        stage_runs.append(run_stage(stage, sets, batch))
    direct = max(direct_runs, key=lambda r: r["tokens_per_s"])
    staged = max(stage_runs, key=lambda r: r["tokens_per_s"])
    return {
        "batch": batch,
        "direct": direct,
        "stage": staged,
        "all_tokens_per_s": {
            "direct": [r["tokens_per_s"] for r in direct_runs],
            "stage": [r["tokens_per_s"] for r in stage_runs],
        },
        "stage_over_direct": round(staged["tokens_per_s"] / max(direct["tokens_per_s"], 1e-9), 3),
        "stage_over_direct_median": round(
            statistics.median(r["tokens_per_s"] for r in stage_runs)
            / max(statistics.median(r["tokens_per_s"] for r in direct_runs), 1e-9),
            3,
        ),
    }


CASES: dict[str, Callable[[Backend, int, int], dict]] = {
    "batched_vs_single": case_batched_vs_single,
    "stage_vs_direct": case_stage_vs_direct,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also bench SmolLM2-135M")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="stage_vs_direct: alternating runs of each side (best and median kept)",
    )
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    from tiny_model import tiny_model_dir

    models = {"tiny": tiny_model_dir()}
    if args.smollm2:
        from workers.models import prepare_smollm2

        models["smollm2-135m"] = prepare_smollm2()
    results: dict[str, dict] = {}
    for label, path in models.items():
        backend = make_backend(
            BackendSettings(kind="transformers", model=str(path), max_batch_size=16)
        )
        for name in args.case or sorted(CASES):
            extra = {"repeats": args.repeats} if name == "stage_vs_direct" else {}
            result = CASES[name](backend, args.prompts, args.max_tokens, **extra)
            results[f"{label}/{name}"] = result
            print(f"{label}/{name}: {json.dumps(result)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
