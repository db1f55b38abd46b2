"""Token budgets against the cold-start rationales: the token lengths, under SmolLM2's tokenizer,
of the rationale completions p_θ and q_φ learn in the cold start (the rationale, then the
closing delimiter the stop string ends on: ``rationale_completion``), on the held-out pool the
trainer measures on, on the cold-start seeds of each profile, and on all of GSM8K train; then
each decode budget against them (none may truncate a held-out rationale).

    python -m bench --case budgets
"""

from __future__ import annotations

import statistics

from bench.harness import Row, row
from llm.prompts import rationale_completion

CASE = "budgets"


def _lengths(tokenizer, rationales: list[str]) -> list[int]:
    texts = [rationale_completion(z) for z in rationales]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))])


def distribution(name: str, lengths: list[int]) -> list[Row]:
    rows = [row(CASE, f"{name}: rationales", len(lengths), "n")]
    for label, value in (
        ("min", min(lengths)),
        ("median", statistics.median(lengths)),
        ("p90", _quantile(lengths, 0.9)),
        ("p99", _quantile(lengths, 0.99)),
        ("max", max(lengths)),
    ):
        rows.append(row(CASE, f"{name}: {label}", float(value), "tokens"))
    return rows


def measure(quick: bool = False) -> list[Row]:
    from transformers import AutoTokenizer

    from llm.smollm2 import prepare_smollm2
    from promptcot.settings import Settings
    from trainer.coldstart import cold_start_data
    from trainer.heldout import is_heldout
    from workers.annotation import annotate_from_seed
    from workers.seeds import load_seeds

    tokenizer = AutoTokenizer.from_pretrained(str(prepare_smollm2()))
    rows: list[Row] = []
    held: list[int] = []
    budgets: dict[str, dict[str, int]] = {}
    for profile in ("cpu", "gpu"):
        settings = Settings(trainer={"profile": profile}, metrics={"port": 0})
        data = cold_start_data(settings)
        fraction = settings.trainer.heldout_fraction
        heldout = [s.rationale for s in data.triples if is_heldout(s.seed_id, fraction)]
        trained = [s.rationale for s in data.triples if not is_heldout(s.seed_id, fraction)]
        rows += distribution(
            f"{profile}: cold-start seeds trained on", _lengths(tokenizer, trained)
        )
        held = _lengths(tokenizer, heldout)
        rows += distribution(f"{profile}: held-out pool", held)
        budgets[profile] = {
            "rationale.max_tokens (q_φ samples)": settings.rationale.max_tokens,
            "trainer.m_step.max_rationale_tokens (M-step decode)": (
                settings.trainer.m_step.max_rationale_tokens
            ),
            "generation.max_rationale_tokens (p_θ's rationale)": (
                settings.generation.max_rationale_tokens
            ),
        }
        for name, budget in budgets[profile].items():
            over = sum(n > budget for n in held)
            rows.append(
                row(
                    CASE,
                    f"{profile}: {name} = {budget}: held-out truncated",
                    over,
                    "n",
                    "== 0",
                    over == 0,
                )
            )
    if not quick:
        every = []
        for seed in load_seeds("gsm8k", "train", 100_000):
            try:
                every.append(annotate_from_seed(seed, 5)[1])
            except ValueError:
                continue
        lengths = _lengths(tokenizer, every)
        rows += distribution("all GSM8K train", lengths)
        for profile, named in budgets.items():
            for name, budget in named.items():
                over = sum(n > budget for n in lengths)
                rows.append(row(CASE, f"{profile}: {name} = {budget}: GSM8K train over", over, "n"))
    return rows
