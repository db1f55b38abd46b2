"""Generation on the in-process transformers backend (the tiny test model), side by side:

- batched vs single: tokens/s generating the same prompts in calls of 16 vs one at a time
  (docs/models.md: ~7x on the tiny model, ~9x on SmolLM2-135M on an idle machine).
- stage vs direct: tokens/s of ``GenerateStage.process`` on ConceptSet records (tokens
  from the stage's own counter, promptcot_model_tokens_total{role="prompt_model",
  kind="completion"}) against calling the same backend instance directly on the same rendered
  prompts, in the same two phases (rationale up to its delimiter, then the problem after the
  bridge), same max_tokens, stop strings, sampling and seeds, in the same micro-batches. The
  ratio is the stage's overhead; goal stage >= 0.9x direct.

Runs alternate (single, batched, direct, stage, ...) so drift on a shared machine hits both
sides; figures are medians of the runs with their spread.
"""

from __future__ import annotations

import os
import sys
import time

from bench.harness import ROOT, Row, ratios, timing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASE = "generation (transformers, tiny model)"
CONCEPT_POOL = [
    "addition of whole numbers",
    "equal groups",
    "counting objects",
    "division as equal sharing",
    "units of quantity",
    "whole numbers",
]


def bench_concept_sets(count: int, tag: str = "bench") -> list:
    """Concept sets with varied concepts; ``tag`` makes their ids differ between runs."""
    from streams.records import ConceptSet

    return [
        ConceptSet(
            domain="math",
            difficulty="AIME",
            draw=f"{tag}:{i}",
            concepts=[CONCEPT_POOL[(i + j) % len(CONCEPT_POOL)] for j in range(3)],
        )
        for i in range(count)
    ]


def render(backend, concept_set) -> str:
    """The synthesis prompt the generate stage renders for ``concept_set``."""
    from llm import prompts as P

    cs = concept_set
    return P.SYNTHESIS.render(backend, **P.synthesis_fields(cs.concepts, cs.difficulty, cs.domain))


def direct_calls(backend, gen, prompts: list[str], seed: int) -> int:
    """The generate stage's two backend calls for ``prompts``, made directly (no records, no
    parsing, no metrics): completion tokens."""
    from llm import prompts as P
    from workers.stages.generate import BRIDGE

    def call(batch: list[str], max_tokens: int, stop: list[str], seed: int) -> list:
        if not batch:
            return []
        out = backend.generate(
            batch,
            n=1,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
        )
        return [c[0] for c in out]

    rationales = call(prompts, gen.max_rationale_tokens, [P.RATIONALE_CLOSE, P.PROBLEM_OPEN], seed)
    problems = call(
        [p + z.text.rstrip() + BRIDGE for p, z in zip(prompts, rationales) if z.ok],
        gen.max_problem_tokens,
        [P.PROBLEM_CLOSE],
        seed + 1,
    )
    return sum(c.n_completion_tokens for c in (*rationales, *problems))


def direct_record(backend, gen, concept_set) -> int:
    """One concept set's calls, as a stage that hands records over one by one makes them."""
    from workers.stages.generate import batch_seed

    return direct_calls(backend, gen, [render(backend, concept_set)], batch_seed([concept_set]))


def _tokens_per_s(fn) -> float:
    started = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - started)


def _completion_tokens() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "promptcot_model_tokens_total", {"role": "prompt_model", "kind": "completion"}
    )
    return value or 0.0


def measure(quick: bool = False) -> list[Row]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_dir

    from llm.roles import Role
    from promptcot.settings import Settings
    from workers.stages.generate import GenerateStage, batch_seed

    n_prompts, max_tokens, runs, batch = (16, 32, 3, 16) if quick else (32, 64, 3, 16)
    model = str(tiny_model_dir())
    settings = Settings(
        models={"prompt_model": {"kind": "transformers", "model": model, "max_batch_size": 16}},
        metrics={"port": 0},
        generation={"max_rationale_tokens": max_tokens, "max_problem_tokens": max_tokens},
    )
    stage = GenerateStage(settings)
    stage.ensure_ready()  # the model loads once; the direct calls use this same instance
    backend = stage.backend(Role.PROMPT_MODEL)
    gen = settings.generation
    sets = bench_concept_sets(n_prompts)
    prompts = [render(backend, cs) for cs in sets]
    backend.generate(prompts[:2], max_tokens=4)  # warm-up

    def in_calls_of(size: int) -> int:
        tokens = 0
        for i in range(0, len(prompts), size):
            for item in backend.generate(
                prompts[i : i + size], temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=i
            ):
                tokens += sum(c.n_completion_tokens for c in item)
        return tokens

    chunks = [sets[i : i + batch] for i in range(0, len(sets), batch)]

    def direct() -> int:
        tokens = 0
        for chunk in chunks:
            tokens += direct_calls(
                backend, gen, [render(backend, cs) for cs in chunk], batch_seed(chunk)
            )
        return tokens

    def staged() -> int:
        before = _completion_tokens()
        for chunk in chunks:
            stage.process(chunk)
        return int(_completion_tokens() - before)

    single, batched, direct_runs, stage_runs = [], [], [], []
    for _ in range(runs):
        single.append(_tokens_per_s(lambda: in_calls_of(1)))
        batched.append(_tokens_per_s(lambda: in_calls_of(batch)))
        direct_runs.append(_tokens_per_s(direct))
        stage_runs.append(_tokens_per_s(staged))
    setup = f"{n_prompts} prompts, {max_tokens} tokens"
    return [
        timing(
            CASE,
            f"batch {batch} / batch 1, tokens/s ({setup})",
            ratios(batched, single),
            "x",
            at_least=4,
        ),
        timing(CASE, "batch 1", single, "tokens/s"),
        timing(CASE, f"batch {batch}", batched, "tokens/s"),
        timing(
            CASE,
            f"generate stage / direct calls, tokens/s (micro-batches of {batch})",
            ratios(stage_runs, direct_runs),
            "x",
            at_least=0.9,
        ),
        timing(CASE, "generate stage (process)", stage_runs, "tokens/s"),
        timing(CASE, "direct calls", direct_runs, "tokens/s"),
    ]
