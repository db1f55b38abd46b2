"""Score a model as a solver on a shipped benchmark: the solver's own template (llm/prompts.py
``SOLVER_MATH``), greedy decoding in batches, the final answer extracted and compared by the
verifier's equivalence oracle (verification/mathcheck). ``promptcot eval`` runs it on any model; the
trainer runs it on a fixed subset after each DPO update (``trainer.eval``).

Benchmarks: ``gsm8k`` (the test split), ``aime24``, ``aime25``, ``hmmt25`` (corpora/benchmarks).
LiveCodeBench (``lcb_v5``, ``lcb_v6``) ships prompts only, not its tests: it cannot be scored
here. ``--limit N`` takes the first N problems, so the same subset is compared across versions.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import corpora
from llm.backends.base import Backend, BackendSettings
from llm.prompts import SOLVER_MATH
from streams import memory, metrics
from trainer.settings import Benchmark

if TYPE_CHECKING:
    from trainer.settings import EvalConfig

MATH_SETS = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "hmmt25": "hmmt25.jsonl"}
BENCHMARKS: tuple[str, ...] = get_args(Benchmark)
NOT_SCORABLE = {
    "lcb_v5": "LiveCodeBench v5 ships its prompts only, not its tests: it cannot be scored here",
    "lcb_v6": "LiveCodeBench v6 ships its prompts only, not its tests: it cannot be scored here",
}


@dataclass(frozen=True)
class Problem:
    id: str
    text: str
    reference: str


@dataclass
class EvalResult:
    benchmark: str
    model: str
    version: str
    role: str
    n: int
    correct: int
    seconds: float
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


def load_problems(benchmark: str, limit: int | None = None) -> list[Problem]:
    """The first ``limit`` problems of a benchmark, with reference answers."""
    if benchmark in NOT_SCORABLE:
        raise ValueError(NOT_SCORABLE[benchmark])
    if benchmark == "gsm8k":
        from workers.seeds import load_seeds

        seeds = load_seeds("gsm8k", "test", limit)
        return [Problem(s.source_id, s.text, s.answer or "") for s in seeds]
    if benchmark not in MATH_SETS:
        raise ValueError(f"unknown benchmark {benchmark!r} (known: {', '.join(BENCHMARKS)})")
    from vectorstore.text import clean_problem_text
    from workers.seeds import gsm8k_final_answer

    out = []
    path = corpora.path("benchmarks", MATH_SETS[benchmark])
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if limit is not None and len(out) >= limit:
            break
        if line.strip():
            data = json.loads(line)
            reference = gsm8k_final_answer(data["reference_solution"])  # "... #### answer"
            out.append(Problem(f"{benchmark}:{row}", clean_problem_text(data["prompt"]), reference))
    return out


def score(problems: list[Problem], solutions: list[str], oracle: Any) -> list[dict[str, Any]]:
    """Per problem: the solution's final answer (verification/mathcheck) and whether the oracle
    finds it equivalent to the reference."""
    from verification.mathcheck import extract_answer

    answers = [extract_answer(text) if text else None for text in solutions]
    pairs = [(a, p.reference) for a, p in zip(answers, problems) if a is not None]
    verdicts = iter(oracle.equivalent_many(pairs))
    return [
        {
            "id": p.id,
            "reference": p.reference,
            "answer": a,
            "correct": a is not None and next(verdicts),
        }
        for p, a in zip(problems, answers)
    ]


def evaluate(
    backend: Backend,
    benchmark: str = "gsm8k",
    limit: int | None = None,
    *,
    max_tokens: int = 256,
    batch_size: int = 8,
    role: str = "",
    model: str = "",
) -> EvalResult:
    """Greedy solutions to the first ``limit`` problems, scored; sets the accuracy gauge of
    this version."""
    from verification.mathcheck import EquivalenceOracle

    problems = load_problems(benchmark, limit)
    started = time.monotonic()
    items: list[dict[str, Any]] = []
    with EquivalenceOracle() as oracle:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [SOLVER_MATH.render(backend, problem=p.text) for p in chunk]
            outs = backend.generate(prompts, n=1, temperature=0.0, max_tokens=max_tokens, seed=0)
            completions = [o[0] if o else None for o in outs]
            items += score(chunk, [c.text if c and c.ok else "" for c in completions], oracle)
            for item, c in zip(items[-len(chunk) :], completions):
                item["finish"] = c.finish_reason if c else "error"
    result = EvalResult(
        benchmark=benchmark,
        model=model or backend.settings.model,
        version=backend.model_version,
        role=role,
        n=len(items),
        correct=sum(i["correct"] for i in items),
        seconds=time.monotonic() - started,
        items=items,
    )
    metrics.EVAL_ACCURACY.labels(
        benchmark=benchmark, role=role or "model", version=result.version
    ).set(result.accuracy)
    return result


def evaluate_path(
    model_path: str, cfg: EvalConfig, *, role: str = "", backend: BackendSettings | None = None
) -> EvalResult:
    """``evaluate`` on a model folder (a full model, or a LoRA adapter folder on its base),
    loaded with the transformers backend unless ``backend`` says otherwise."""
    from llm.backends.pool import new_backend

    settings = (backend or BackendSettings()).model_copy(
        update={"model": model_path, "max_batch_size": max(cfg.batch_size, 1)}
    )
    engine = new_backend(settings)  # a private instance: evaluation must not swap a served one
    if hasattr(engine, "label"):  # the memory account's component (streams/memory.py)
        engine.label = f"eval {role or model_path}"
    try:
        return evaluate(
            engine,
            cfg.benchmark,
            cfg.limit,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
            role=role,
            model=model_path,
        )
    finally:
        engine.close()
        memory.release()  # the eval's model and activations go back to the system


def write_json(result: EvalResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2))
