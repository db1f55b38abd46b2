"""Score a model as a solver on a fixed item set, and compare two models on the same items.

Per item, two measurements (either can be skipped):

- solving: greedy decoding in batches with the solver's own template (llm/prompts.py
  ``SOLVER_MATH``), the final answer extracted and compared by the verifier's equivalence oracle
  (verification/mathcheck): accuracy (95% Wilson interval), the truncation rate (the token budget
  ran out) and the answer-extracted rate;
- the gold solution's NLL (GSM8K only: the other sets ship no worked solutions): teacher-forced
  after the same prompt, summed over its tokens. A run reports the NLL per token over all items
  (summed NLL / summed tokens, a bootstrap interval over items). It moves long before accuracy
  does on a 135M model, and costs one forward pass per item instead of a decoding.

Item sets: GSM8K's default is a fixed subset of 300 test problems, drawn once and written down
(``corpora/gsm8k/test-subset-300.json``, its rule inside); ``items="all"`` is the whole test split.
aime24, aime25 and hmmt25 (30 each) are always whole. ``limit`` takes the first N items of the set
(the subset is stored in draw order, so its first N are a uniform sample too). LiveCodeBench ships
prompts only, not its tests: it cannot be scored.

``compare`` pairs two results on the same items (trainer/stats.py): McNemar's exact test for
accuracy, the paired bootstrap for the gold NLL per token; the trainer's eval after DPO,
``promptcot eval`` and bench/loop.py all use this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import corpora
from llm.backends.base import Backend, BackendSettings
from llm.prompts import SOLVER_MATH
from streams import memory, metrics
from trainer import stats
from trainer.settings import Benchmark

if TYPE_CHECKING:
    from trainer.settings import EvalConfig

MATH_SETS = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "hmmt25": "hmmt25.jsonl"}
BENCHMARKS: tuple[str, ...] = get_args(Benchmark)
NOT_SCORABLE = {
    "lcb_v5": "LiveCodeBench v5 ships its prompts only, not its tests: it cannot be scored here",
    "lcb_v6": "LiveCodeBench v6 ships its prompts only, not its tests: it cannot be scored here",
}
ItemSet = Literal["subset", "all"]
SUBSETS = {"gsm8k": ("gsm8k", "test-subset-300.json")}
GOLD_BENCHMARKS = ("gsm8k",)  # the sets that ship worked solutions
GOLD_FORMAT = (
    "GSM8K worked solution, <<...>> calculator notes removed, its '#### N' line replaced by "
    "'The answer is \\boxed{N}.' (workers/annotation.py solver_gold_solution); teacher-forced "
    "after the SOLVER_MATH prompt, the end-of-turn token not counted"
)


@dataclass(frozen=True)
class Problem:
    id: str
    text: str
    reference: str
    solution: str | None = None  # the gold solution in the solver's format (GSM8K)


def subset_ids(benchmark: str) -> list[str] | None:
    """The ids of a benchmark's fixed default subset, in draw order (None: it has none)."""
    if benchmark not in SUBSETS:
        return None
    data = json.loads(corpora.path(*SUBSETS[benchmark]).read_text(encoding="utf-8"))
    return list(data["ids"])


def load_problems(
    benchmark: str, limit: int | None = None, items: ItemSet = "subset"
) -> list[Problem]:
    """The first ``limit`` problems of a benchmark's item set, with reference answers (and, for
    GSM8K, gold solutions)."""
    if benchmark in NOT_SCORABLE:
        raise ValueError(NOT_SCORABLE[benchmark])
    if items not in get_args(ItemSet):
        raise ValueError(f"unknown item set {items!r} (known: subset, all)")
    if benchmark == "gsm8k":
        from workers.annotation import solver_gold_solution
        from workers.seeds import load_seeds

        seeds = load_seeds("gsm8k", "test")
        ids = subset_ids(benchmark) if items == "subset" else None
        if ids is not None:
            by_id = {s.source_id: s for s in seeds}
            seeds = [by_id[i] for i in ids]
        return [
            Problem(s.source_id, s.text, s.answer or "", solver_gold_solution(s.solution or ""))
            for s in seeds[:limit]
        ]
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


# ---------------------------------------------------------------------------------------------
# Measuring


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


def solve(
    backend: Backend, problems: list[Problem], max_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """Greedy solutions, scored: per item the answer, correct, finish ("stop", "length" or
    "error"), extracted (an answer was found) and truncated (the token budget ran out)."""
    from verification.mathcheck import EquivalenceOracle

    out: list[dict[str, Any]] = []
    with EquivalenceOracle() as oracle:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            prompts = [SOLVER_MATH.render(backend, problem=p.text) for p in chunk]
            outs = backend.generate(prompts, n=1, temperature=0.0, max_tokens=max_tokens, seed=0)
            completions = [o[0] if o else None for o in outs]
            scored = score(chunk, [c.text if c and c.ok else "" for c in completions], oracle)
            for item, c in zip(scored, completions):
                item["finish"] = c.finish_reason if c else "error"
                item["extracted"] = item["answer"] is not None
                item["truncated"] = item["finish"] == "length"
            out += scored
    return out


def gold_nll(model: Any, tokenizer: Any, problems: list[Problem]) -> list[tuple[float, int] | None]:
    """Per problem, (summed NLL, tokens) of its gold solution after the solver's prompt, under an
    in-memory HF model (None: no gold solution). One item per call: the logits of one sequence
    at a time, the LM head on the solution's positions only (trainer/engine.py)."""
    from trainer.engine import continuation_nll

    out: list[tuple[float, int] | None] = []
    for p in problems:
        if not p.solution:
            out.append(None)
            continue
        prompt = SOLVER_MATH.render(tokenizer, problem=p.text)
        total, count = continuation_nll(model, tokenizer, [prompt], [p.solution], batch_size=1)
        out.append((total, count) if count else None)
    return out


def backend_gold_nll(backend: Backend, problems: list[Problem]) -> list[tuple[float, int] | None]:
    """``gold_nll`` with a backend's model when it holds one in process (transformers); else
    the backend's own teacher-forced scoring (vLLM, an OpenAI-compatible server)."""
    model, tokenizer = getattr(backend, "model", None), getattr(backend, "tokenizer", None)
    if model is not None and tokenizer is not None and hasattr(model, "parameters"):
        return gold_nll(model, tokenizer, problems)
    todo = [i for i, p in enumerate(problems) if p.solution]
    scores = backend.score(
        [SOLVER_MATH.render(backend, problem=problems[i].text) for i in todo],
        [problems[i].solution or "" for i in todo],
    )
    out: list[tuple[float, int] | None] = [None] * len(problems)
    for i, s in zip(todo, scores):
        if s.ok and s.n_tokens:
            out[i] = (-s.total_logprob, s.n_tokens)
    return out


def _with_gold(items: list[dict[str, Any]], nlls: list[tuple[float, int] | None]) -> None:
    for item, nll in zip(items, nlls):
        item["gold_nll"], item["gold_tokens"] = nll if nll is not None else (None, 0)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class EvalResult:
    """One model on one item set. ``items`` holds the per-item results (pairable by id);
    ``solved`` says whether solutions were generated (False: the gold NLL alone)."""

    benchmark: str
    model: str
    version: str
    role: str
    n: int
    correct: int
    seconds: float
    items: list[dict[str, Any]] = field(default_factory=list)
    item_set: str = "subset"
    solved: bool = True
    max_tokens: int | None = None
    template: str = SOLVER_MATH.id
    solve_seconds: float = 0.0
    gold_seconds: float = 0.0

    @property
    def accuracy(self) -> float | None:
        if not self.solved:
            return None
        return self.correct / self.n if self.n else 0.0

    @property
    def accuracy_interval(self) -> tuple[float, float] | None:
        return stats.wilson_interval(self.correct, self.n) if self.solved else None

    def _share(self, key: str) -> float | None:
        if not self.solved or not self.n:
            return None
        return sum(bool(i.get(key)) for i in self.items) / self.n

    @property
    def truncation_rate(self) -> float | None:
        return self._share("truncated")

    @property
    def extracted_rate(self) -> float | None:
        return self._share("extracted")

    def _gold(self) -> list[dict[str, Any]]:
        return [i for i in self.items if i.get("gold_nll") is not None]

    @property
    def gold_tokens(self) -> int:
        return sum(i["gold_tokens"] for i in self._gold())

    @property
    def gold_nll_per_token(self) -> float | None:
        gold = self._gold()
        return sum(i["gold_nll"] for i in gold) / self.gold_tokens if gold else None

    @property
    def gold_nll_interval(self) -> tuple[float, float] | None:
        gold = self._gold()
        if not gold:
            return None
        return stats.ratio_interval([i["gold_nll"] for i in gold], [i["gold_tokens"] for i in gold])

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_interval": self.accuracy_interval,
            "accuracy_interval_method": "Wilson score, 95%",
            "truncation_rate": self.truncation_rate,
            "extracted_rate": self.extracted_rate,
            "gold_items": len(self._gold()),
            "gold_tokens": self.gold_tokens,
            "gold_nll_per_token": self.gold_nll_per_token,
            "gold_nll_interval": self.gold_nll_interval,
            "gold_nll_interval_method": f"percentile bootstrap over items, "
            f"{stats.BOOTSTRAP_RESAMPLES} resamples, 95%",
            "gold_format": GOLD_FORMAT if self._gold() else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        """A result written by ``write_json`` (the summary is recomputed from the items)."""
        names = {f.name for f in fields(cls)}
        missing = {"benchmark", "n", "items"} - set(data)
        if missing:
            raise ValueError(f"not an eval result: no {', '.join(sorted(missing))}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs.setdefault("model", "")
        kwargs.setdefault("version", "")
        kwargs.setdefault("role", "")
        kwargs.setdefault("correct", sum(bool(i.get("correct")) for i in data["items"]))
        kwargs.setdefault("seconds", 0.0)
        return cls(**kwargs)

    @property
    def label(self) -> str:
        return f"{self.model} ({self.version})" if self.version else self.model


def set_gauges(result: EvalResult) -> None:
    """The eval gauges of this version (Prometheus)."""
    labels = {"benchmark": result.benchmark, "role": result.role or "model"}
    if result.accuracy is not None:
        metrics.EVAL_ACCURACY.labels(**labels, version=result.version).set(result.accuracy)
    if result.gold_nll_per_token is not None:
        metrics.EVAL_GOLD_NLL.labels(**labels, version=result.version).set(
            result.gold_nll_per_token
        )


def evaluate(
    backend: Backend,
    benchmark: str = "gsm8k",
    limit: int | None = None,
    *,
    items: ItemSet = "subset",
    solve_items: bool = True,
    gold: bool = True,
    max_tokens: int = 256,
    batch_size: int = 8,
    role: str = "",
    model: str = "",
) -> EvalResult:
    """A model on the first ``limit`` items of a benchmark's item set: greedy solutions, scored
    (unless ``solve_items`` is False), and the gold solutions' NLL (``gold``, GSM8K only); sets
    the eval gauges of this version."""
    problems = load_problems(benchmark, limit, items)
    started = time.monotonic()
    records: list[dict[str, Any]] = [{"id": p.id, "reference": p.reference} for p in problems]
    if solve_items:
        records = solve(backend, problems, max_tokens, batch_size)
    solved_at = time.monotonic()
    if gold and benchmark in GOLD_BENCHMARKS:
        _with_gold(records, backend_gold_nll(backend, problems))
    ended = time.monotonic()
    result = EvalResult(
        benchmark=benchmark,
        model=model or backend.settings.model,
        version=backend.model_version,
        role=role,
        n=len(records),
        correct=sum(bool(i.get("correct")) for i in records),
        seconds=ended - started,
        items=records,
        item_set=items if benchmark in SUBSETS else "all",
        solved=solve_items,
        max_tokens=max_tokens if solve_items else None,
        solve_seconds=solved_at - started,
        gold_seconds=ended - solved_at,
    )
    set_gauges(result)
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
            items=cfg.items,
            solve_items=cfg.solve,
            gold=cfg.gold_nll,
            max_tokens=cfg.max_tokens,
            batch_size=cfg.batch_size,
            role=role,
            model=model_path,
        )
    finally:
        engine.close()
        memory.release()  # the eval's model and activations go back to the system


def evaluate_gold(
    model: Any,
    tokenizer: Any,
    limit: int | None = None,
    *,
    items: ItemSet = "subset",
    label: str = "in memory",
    version: str = "",
) -> EvalResult:
    """The gold NLL alone of an in-memory HF model on GSM8K's item set (a trained arm of an
    experiment, before or without saving it), as a result ``compare`` can pair."""
    problems = load_problems("gsm8k", limit, items)
    started = time.monotonic()
    records: list[dict[str, Any]] = [{"id": p.id, "reference": p.reference} for p in problems]
    _with_gold(records, gold_nll(model, tokenizer, problems))
    seconds = time.monotonic() - started
    return EvalResult(
        benchmark="gsm8k",
        model=label,
        version=version,
        role="",
        n=len(records),
        correct=0,
        seconds=seconds,
        items=records,
        item_set=items,
        solved=False,
        gold_seconds=seconds,
    )


def write_json(result: EvalResult | Comparison, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2))


def read_json(path: Path) -> EvalResult:
    """An eval result written by ``write_json`` (ValueError: not one)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not an eval result")
    try:
        return EvalResult.from_json(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Comparing


@dataclass(frozen=True)
class Comparison:
    """Two results paired on their items: accuracy (when both solved them with the same token
    budget) and the gold NLL per token (when both have it), each a ``stats.Paired``."""

    benchmark: str
    a: str
    b: str
    n: int
    accuracy: stats.Paired | None
    gold_nll: stats.Paired | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "a": self.a,
            "b": self.b,
            "n": self.n,
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "gold_nll_per_token": self.gold_nll.to_json() if self.gold_nll else None,
            "notes": self.notes,
        }


def compare(a: EvalResult, b: EvalResult, names: tuple[str, str] = ("A", "B")) -> Comparison:
    """A vs B on the same items (ValueError when they were not scored on the same items with
    the same template): the paired difference A - B of accuracy (McNemar) and of the gold NLL
    per token (paired bootstrap), each with its 95% interval and verdict."""
    if a.benchmark != b.benchmark:
        raise ValueError(f"{names[0]} is {a.benchmark}, {names[1]} is {b.benchmark}: no pairs")
    if a.template != b.template:
        raise ValueError(
            f"{names[0]} and {names[1]} were scored with different solver templates "
            f"({a.template}, {b.template})"
        )
    by_id_b = {i["id"]: i for i in b.items}
    ids = [i["id"] for i in a.items]
    if set(ids) != set(by_id_b) or len(ids) != len(by_id_b):
        shared = len(set(ids) & set(by_id_b))
        raise ValueError(
            f"{names[0]} and {names[1]} were scored on different items ({len(ids)} and "
            f"{len(by_id_b)}, {shared} shared): score both with the same --limit / --all"
        )
    pairs = [(i, by_id_b[i["id"]]) for i in a.items]
    notes: list[str] = []
    accuracy = None
    if not (a.solved and b.solved):
        unsolved = [n for n, r in zip(names, (a, b)) if not r.solved]
        notes.append(f"accuracy not compared: {' and '.join(unsolved)} not solved (gold NLL only)")
    elif a.max_tokens != b.max_tokens:
        notes.append(
            f"accuracy not compared: token budgets differ ({a.max_tokens} and {b.max_tokens})"
        )
    else:
        accuracy = stats.paired_accuracy(
            [bool(x.get("correct")) for x, _ in pairs],
            [bool(y.get("correct")) for _, y in pairs],
            names=names,
        )
    gold = [
        (x, y) for x, y in pairs if x.get("gold_nll") is not None and y.get("gold_nll") is not None
    ]
    gold_nll = None
    if gold:
        if len(gold) < len(pairs):
            notes.append(f"gold NLL compared on the {len(gold)} items both have it")
        if any(x["gold_tokens"] != y["gold_tokens"] for x, y in gold):
            notes.append("gold token counts differ (different tokenizers): ratios of sums")
        gold_nll = stats.paired_ratio(
            ([x["gold_nll"] for x, _ in gold], [x["gold_tokens"] for x, _ in gold]),
            ([y["gold_nll"] for _, y in gold], [y["gold_tokens"] for _, y in gold]),
            measure="gold NLL per token",
            higher_is_better=False,
            names=names,
        )
    else:
        notes.append("gold NLL not compared: not measured on both")
    return Comparison(a.benchmark, a.label, b.label, len(pairs), accuracy, gold_nll, notes)


# ---------------------------------------------------------------------------------------------
# Reading


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def result_lines(result: EvalResult) -> list[str]:
    """A result as the lines ``promptcot eval`` prints."""
    what = f"{result.benchmark} {result.item_set} ({result.n} items)"
    lines = [f"{what}: {result.label}"]
    if result.solved and result.accuracy is not None and result.accuracy_interval is not None:
        low, high = result.accuracy_interval
        lines.append(
            f"  accuracy {result.correct}/{result.n} = {_pct(result.accuracy)} "
            f"(95% Wilson {_pct(low)}-{_pct(high)}); truncated {_pct(result.truncation_rate or 0)}"
            f", answer extracted {_pct(result.extracted_rate or 0)} "
            f"[{result.max_tokens} tokens, {result.solve_seconds:,.0f}s]"
        )
    if result.gold_nll_per_token is not None and result.gold_nll_interval is not None:
        low, high = result.gold_nll_interval
        lines.append(
            f"  gold NLL {result.gold_nll_per_token:.4f} nats/token (95% bootstrap "
            f"{low:.4f}-{high:.4f}; {result.gold_tokens:,} tokens) [{result.gold_seconds:,.0f}s]"
        )
    return lines


def paired_line(p: stats.Paired) -> str:
    if p.measure == "accuracy":
        figures = (
            f"A {_pct(p.a)}, B {_pct(p.b)}, A - B = {100 * p.difference:+.1f} points "
            f"(95% interval {100 * p.low:+.1f} to {100 * p.high:+.1f}; McNemar exact "
            f"p = {p.p_value:.3g}, {', '.join(f'{k}: {v}' for k, v in p.detail.items())})"
        )
    else:
        figures = (
            f"A {p.a:.4f}, B {p.b:.4f}, A - B = {p.difference:+.4f} "
            f"(95% paired bootstrap {p.low:+.4f} to {p.high:+.4f})"
        )
    return f"  {p.measure}: {figures}: {p.verdict}"


def comparison_lines(c: Comparison) -> list[str]:
    """A comparison as the lines ``promptcot eval --compare`` prints."""
    lines = [f"{c.benchmark}, {c.n} paired items", f"  A: {c.a}", f"  B: {c.b}"]
    lines += [paired_line(p) for p in (c.accuracy, c.gold_nll) if p is not None]
    lines += [f"  ({note})" for note in c.notes]
    return lines
