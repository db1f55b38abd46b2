"""The experiment with controls (issue 17 item 6), on the embedded default (SmolLM2-135M, the
trainer's cpu profile): does the factory's output teach a real model something, and is its
verification worth anything? Every solver arm takes the same number of optimiser steps and is
scored on the same GSM8K-test items (the fixed subset, trainer/evaluate.py); every EM arm takes
the same number of M-step optimiser steps on the same seeds and is scored on the same held-out
seeds.

Solver arms (SFT through the training engine, trainer/sft.py, LoRA as the cpu profile's solver
SFT settings say, each arm from the base weights with a fresh optimiser and the same seed):

- ``base``: no training;
- ``A``: GSM8K-train gold solutions in the solver's format (workers/annotation.py);
- ``B``: A with half its items replaced by the factory's verified traces;
- ``C``: rejection-sampled fine-tuning on the factory's verified traces only: the rollouts that
  agree with the designer's reference, untruncated, with a final answer (the verify stage's own
  verdicts on the recorded rollouts, then the traces stage's own selection);
- ``C0``: as C, the same number of examples, from the factory's candidates without verification:
  each candidate's first finished rollout whatever it answers (then its second, and so on).

A is one pass of the step budget (steps x batch size GSM8K items, none seen twice); B keeps A's
first half and fills the second with C's traces, in turn (repeated when C has fewer), so that
half of every arm-B pass is the factory's and A and B see as many examples.

EM arms (p_θ from the factory's cold-started checkpoint, M-steps as trainer/em.py builds them, on
GSM8K-train seeds after the cold start's, annotated by the annotate stage):

- ``q_phi``: each seed's rationale decoded greedily from the cold-started q_φ (as the M-step does;
  one that does not parse is kept as written);
- ``annotation``: the fixed annotation rationale (the cold-start data's kind);
- ``none``: an empty rationale.

Each is scored by the trainer's held-out signal: the NLL per token of the held-out seeds' problems
given (c, z) with their annotation rationale, and, beside it, given each arm's own kind of z.

Goals, each a paired 95% interval (trainer/stats.py): B not worse than A and C better than base
and than C0 on the gold-solution NLL; EM arm (i) at or below (ii) on the held-out NLL. An interval
that touches 0 reads "no evidence", never "holds".

The factory folder is one ``python -m bench.reference`` wrote (candidates.jsonl,
rollouts.jsonl, checkpoints/); it is only read. Each arm's result is kept in ``--out`` and a run
that is started again takes the arms it has from there.

    python -m bench.experiment --out bench-out/experiment --factory bench-out/reference
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASE = "experiment"
SOLVER_ARMS = ("base", "A", "B", "C", "C0")
EM_ARMS = ("q_phi", "annotation", "none")
HOLDS, FAILS, NO_EVIDENCE, NOT_RUN = "holds", "fails", "no evidence", "not run"


@dataclass(frozen=True)
class Budget:
    """What every arm gets: optimiser steps, eval items, seeds. The defaults fit the whole run
    in about 35 minutes on 2 loaded cores (docs/training.md, "The experiment with controls"):
    a solver SFT step of 4 examples takes ~25 s there, a gold NLL ~3 s an item."""

    solver_steps: int = 8
    em_steps: int = 6
    eval_items: int = 50
    em_seeds: int = 16  # M-step seeds (GSM8K train, after the cold start's)
    heldout_seeds: int = 24  # held-out seeds the EM arms are scored on
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# The factory's data


@dataclass
class FactoryData:
    """What the factory folder gives the solver arms."""

    candidates: int  # candidates with recorded rollouts
    candidates_written: int  # candidates in candidates.jsonl (rollouts may lag behind)
    accepted: int
    reasons: dict[str, int]
    verified: list[dict[str, str]]  # C's rows: traces of accepted problems
    verified_ids: list[str]  # the rollout each row is: "<candidate id>#<rollout index>"
    unverified: list[dict[str, str]]  # C0's rows
    unverified_ids: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "candidates_written": self.candidates_written,
            "candidates_with_rollouts": self.candidates,
            "accepted": self.accepted,
            "reasons": self.reasons,
            "verified_traces": len(self.verified),
            "unverified_examples": len(self.unverified),
        }


class _ChatML:
    """What ReplayBackend renders prompts with: the recorded rollouts are found by the problem
    text inside the prompt, whatever the chat markup."""

    def __init__(self, model: str):
        from llm.backends.base import BackendSettings

        self.settings = BackendSettings(model=model)
        self.model_version = "replay"

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        from llm.backends.base import chatml

        return chatml(messages)


def read_factory(folder: Path) -> tuple[list[Any], dict[str, list[Any]], int]:
    """(candidates that have rollouts, in file order; rollouts per candidate id; candidates
    written) from a bench.reference folder, read as it is now (a run may still be writing)."""
    from bench.reference import _lines
    from llm.backends.base import Completion
    from streams.records import CandidateProblem

    cands = []
    for line in _lines(folder / "candidates.jsonl"):
        try:
            cands.append(CandidateProblem.model_validate_json(line))
        except ValueError:
            continue  # a line being written
    recorded: dict[str, list[Completion]] = {}
    for line in _lines(folder / "rollouts.jsonl"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        recorded[row["id"]] = [Completion(**c) for c in row["completions"]]
    return [c for c in cands if c.id in recorded], recorded, len(cands)


def factory_data(settings: Any, folder: Path, tokenizer: Any) -> FactoryData:
    """The verify stage's verdicts (designer reference) on the recorded rollouts, the traces
    stage's traces of the accepted ones (C), and as many unverified rollouts (C0)."""
    from bench.reference import ReplayBackend
    from llm.roles import Role
    from streams.topics import TRACES
    from trainer.traces import trace_row
    from workers.stages.traces import TracesStage
    from workers.stages.verify import VerifyStage

    cands, recorded, written = read_factory(folder)
    settings = settings.model_copy(deep=True)
    settings.verify.math.reference = "designer"
    replay = ReplayBackend({c.problem: recorded[c.id] for c in cands}, _ChatML("replay"))
    stage = VerifyStage(settings, backends={Role.SOLVER: replay, Role.TEST_WRITER: replay})
    verdicts = []
    try:
        for start in range(0, len(cands), 4):
            verdicts += [e.record for e in stage.process(cands[start : start + 4])]
    finally:
        stage.close()
    reasons: dict[str, int] = {}
    for v in verdicts:
        reasons[v.reason] = reasons.get(v.reason, 0) + 1
    traces = [e.record for e in TracesStage(settings).process(verdicts) if e.topic is TRACES]
    verified = [trace_row(tokenizer, t) for t in traces]
    verified_ids = [f"{t.problem_id}#{t.index}" for t in traces]
    unverified, unverified_ids = unverified_rows(cands, recorded, len(verified), tokenizer)
    return FactoryData(
        candidates=len(cands),
        candidates_written=written,
        accepted=sum(v.accepted for v in verdicts),
        reasons=reasons,
        verified=verified,
        verified_ids=verified_ids,
        unverified=unverified,
        unverified_ids=unverified_ids,
    )


def unverified_rows(
    cands: list[Any], recorded: dict[str, list[Any]], n: int, tokenizer: Any
) -> tuple[list[dict[str, str]], list[str]]:
    """``n`` examples without verification: each candidate's first finished (untruncated,
    generated) rollout whatever it answers, then each one's second, and so on."""
    from llm.prompts import SOLVER_MATH
    from trainer.solver import solver_prompt

    finished = {
        c.id: [i for i, x in enumerate(recorded[c.id]) if x.ok and not x.truncated and x.text]
        for c in cands
    }
    rows: list[dict[str, str]] = []
    ids: list[str] = []
    depth = 0
    while len(rows) < n and any(len(f) > depth for f in finished.values()):
        for c in cands:
            if len(rows) < n and len(finished[c.id]) > depth:
                index = finished[c.id][depth]
                prompt = solver_prompt(tokenizer, "math", SOLVER_MATH.user_text(problem=c.problem))
                rows.append({"prompt": prompt, "completion": recorded[c.id][index].text})
                ids.append(f"{c.id}#{index}")
        depth += 1
    return rows, ids


def gsm8k_rows(tokenizer: Any, n: int) -> list[dict[str, str]]:
    """The first ``n`` GSM8K-train problems with their gold solutions, in the solver's format
    (the one evaluation scores: trainer/evaluate.py)."""
    from llm.prompts import SOLVER_MATH
    from trainer.solver import solver_prompt
    from workers.annotation import solver_gold_solution
    from workers.seeds import load_seeds

    return [
        {
            "prompt": solver_prompt(tokenizer, "math", SOLVER_MATH.user_text(problem=s.text)),
            "completion": solver_gold_solution(s.solution or ""),
        }
        for s in load_seeds("gsm8k", "train", limit=n)
    ]


# ---------------------------------------------------------------------------------------------
# Solver arms


def solver_examples(data: FactoryData, tokenizer: Any, n_a: int) -> dict[str, list[dict[str, str]]]:
    """Each solver arm's training rows (module docstring); B is not run without traces."""
    gsm8k = gsm8k_rows(tokenizer, n_a)
    half = n_a // 2
    factory = [data.verified[i % len(data.verified)] for i in range(half)] if data.verified else []
    return {
        "base": [],
        "A": gsm8k,
        "B": gsm8k[: n_a - half] + factory if factory else [],
        "C": list(data.verified),
        "C0": list(data.unverified),
    }


def _load(settings: Any, role: str, base_path: str, store_dir: Path, cfg: Any, seed: int):
    import torch

    from trainer.checkpoints import CheckpointStore
    from trainer.role_models import load_role_model

    torch.manual_seed(seed)  # a fresh LoRA adapter's initial weights
    return load_role_model(
        CheckpointStore(store_dir, 1),
        role,
        base_path,
        use_lora=cfg.use_lora,
        lora=cfg.lora,
        dtype=settings.trainer.dtype,
        device=settings.trainer.device,
    )


def run_solver_arm(
    settings: Any, arm: str, rows: list[dict[str, str]], budget: Budget, out: Path
) -> dict[str, Any]:
    """Train one arm from the base solver (``rows``; none: the base) and score its gold NLL;
    the result is kept in ``out/solver-<arm>.json``."""
    from llm.roles import Role, model_path_for
    from trainer.engine import EngineOptions
    from trainer.evaluate import EvalResult, evaluate_gold
    from trainer.sft import sft

    path = out / f"solver-{arm}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = settings.trainer.sft.model_copy(update={"steps_per_window": budget.solver_steps})
    started = time.monotonic()
    rm = _load(
        settings,
        Role.SOLVER,
        model_path_for(settings.models, Role.SOLVER),
        out / "no-checkpoints",
        cfg,
        budget.seed,
    )
    losses = None
    if rows:
        losses = sft(rm, rows, cfg, EngineOptions.of(settings.trainer))
    trained = time.monotonic()
    result: EvalResult = evaluate_gold(rm.model, rm.tokenizer, budget.eval_items, label=arm)
    record = {
        "arm": arm,
        "examples": len(rows),
        "optimizer_steps": len(losses.losses) if losses else 0,
        "train_loss_first": losses.losses[0] if losses else None,
        "train_loss_last": losses.losses[-1] if losses else None,
        "train_s": round(trained - started, 1),
        "eval_s": round(time.monotonic() - trained, 1),
        "eval": result.to_json(),
    }
    del rm
    gc.collect()
    path.write_text(json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------------------------------------
# EM arms


def em_seeds(settings: Any, budget: Budget) -> tuple[list[Any], list[Any]]:
    """(M-step seeds, held-out seeds) as SeedItems annotated by the annotate stage: the first
    ``em_seeds`` GSM8K-train seeds after the cold start's that are not held out, and the first
    ``heldout_seeds`` held-out ones of the source (the cold start never trains on those)."""
    from itertools import islice

    from streams.topics import SEEDS_ANNOTATED
    from trainer.em import SeedItem
    from trainer.heldout import is_heldout
    from workers.seeds import iter_seeds
    from workers.stages.annotate import AnnotateStage

    fraction = settings.trainer.heldout_fraction
    skip = settings.trainer.cold_start.seeds
    stage = AnnotateStage(settings)
    stage.ensure_ready()

    def annotated(seeds: Any, n: int) -> list[SeedItem]:
        out: list[SeedItem] = []
        while len(out) < n and (batch := list(islice(seeds, 16))):
            emits = stage.process(batch)
            out += [SeedItem.from_annotated(e.record) for e in emits if e.topic is SEEDS_ANNOTATED]
        return out[:n]

    try:
        train_source = (
            s
            for s in islice(iter_seeds("gsm8k", "train"), skip, None)
            if not is_heldout(s.id, fraction)
        )
        held_source = (s for s in iter_seeds("gsm8k", "train") if is_heldout(s.id, fraction))
        return annotated(train_source, budget.em_seeds), annotated(
            held_source, budget.heldout_seeds
        )
    finally:
        stage.close()


def run_em_arms(
    settings: Any,
    factory: Path,
    budget: Budget,
    out: Path,
    arms: tuple[str, ...] = ("cold_start", *EM_ARMS),
    own_z: bool = True,
) -> dict[str, Any]:
    """The three M-step arms from the factory's cold-started p_θ (and that p_θ itself,
    ``cold_start``); each arm's held-out NLL per seed is kept in ``out/em-<arm>.json``, and
    ``arms`` says which to run (the others are taken from there when they are)."""
    from llm.roles import Role, model_path_for
    from trainer.checkpoints import CheckpointStore
    from trainer.em import greedy_rationales_as_written, problem_nlls, prompt_model_example
    from trainer.engine import EngineOptions
    from trainer.sft import sft

    t = settings.trainer
    m_cfg = t.m_step.model_copy(update={"steps_per_window": budget.em_steps})
    store_dir = factory / "checkpoints"
    store = CheckpointStore(store_dir, 1)
    cold = {r: store.latest(r) for r in (Role.PROMPT_MODEL, Role.RATIONALE_MODEL)}
    info: dict[str, Any] = {
        "cold_started": {r: (str(c.path) if c else None) for r, c in cold.items()},
        "arms": {},
    }
    seeds_path = out / "em-seeds.json"
    if seeds_path.is_file():
        from trainer.em import SeedItem

        saved = json.loads(seeds_path.read_text())
        train = [SeedItem(**x) for x in saved["train"]]
        held = [SeedItem(**x) for x in saved["heldout"]]
        q_train, q_held = saved["q_train"], saved["q_held"]
        unparsed = saved["q_unparsed"]
    else:
        train, held = em_seeds(settings, budget)
        q = _load(
            settings,
            Role.RATIONALE_MODEL,
            model_path_for(settings.models, Role.RATIONALE_MODEL),
            store_dir,
            t.e_step,
            budget.seed,
        )
        budget_tokens, batch = t.m_step.max_rationale_tokens, t.m_step.generation_batch_size
        decoded = greedy_rationales_as_written(q, train + held, budget_tokens, batch)
        del q
        gc.collect()
        unparsed = sum(not parsed for _, parsed in decoded)
        raw = [z for z, _ in decoded]
        q_train, q_held = raw[: len(train)], raw[len(train) :]
        seeds_path.write_text(
            json.dumps(
                {
                    "train": [asdict(i) for i in train],
                    "heldout": [asdict(i) for i in held],
                    "q_train": q_train,
                    "q_held": q_held,
                    "q_unparsed": unparsed,
                }
            )
        )
    info.update(
        m_step_seeds=len(train),
        heldout_seeds=len(held),
        q_phi_unparsed=unparsed,
        q_phi_unparsed_note="q_φ decodes that did not parse (cut by the budget or empty) are "
        "kept as written, the M-step's own fallback being a best-of-K sample this arm has not",
    )
    own = {
        "cold_start": [i.rationale for i in held],
        "q_phi": q_held,
        "annotation": [i.rationale for i in held],
        "none": ["" for _ in held],
    }
    rationales = {
        "q_phi": q_train,
        "annotation": [i.rationale for i in train],
        "none": ["" for _ in train],
    }
    for arm in ("cold_start", *EM_ARMS):
        path = out / f"em-{arm}.json"
        if path.is_file():
            info["arms"][arm] = json.loads(path.read_text())
            continue
        if arm not in arms:
            continue
        started = time.monotonic()
        p = _load(
            settings,
            Role.PROMPT_MODEL,
            model_path_for(settings.models, Role.PROMPT_MODEL),
            store_dir,
            m_cfg,
            budget.seed,
        )
        losses = None
        if arm != "cold_start":
            items = [i.with_rationale(z) for i, z in zip(train, rationales[arm])]
            examples = [prompt_model_example(p.tokenizer, i) for i in items]
            losses = sft(p, examples, m_cfg, EngineOptions.of(t))
        record = {
            "arm": arm,
            "optimizer_steps": len(losses.losses) if losses else 0,
            "train_loss_first": losses.losses[0] if losses else None,
            "train_loss_last": losses.losses[-1] if losses else None,
            "heldout": problem_nlls(p.model, p.tokenizer, held),
            "seconds": 0.0,
        }
        if arm in ("cold_start", "annotation"):  # their own kind of z is the annotation
            record["heldout_own"] = record["heldout"]
        elif own_z:
            record["heldout_own"] = problem_nlls(
                p.model, p.tokenizer, [i.with_rationale(z) for i, z in zip(held, own[arm])]
            )
        record["seconds"] = round(time.monotonic() - started, 1)
        del p
        gc.collect()
        path.write_text(json.dumps(record))
        info["arms"][arm] = record
    return info


# ---------------------------------------------------------------------------------------------
# Comparisons, goals, the report


def goal_status(paired: Any, want: str) -> str:
    """``want`` "a_lower": the goal holds when the interval of A - B lies below 0; it fails when
    it lies above 0; an interval that touches 0 is no evidence either way."""
    assert want == "a_lower"
    if paired is None:
        return NO_EVIDENCE
    if paired.high < 0:
        return HOLDS
    if paired.low > 0:
        return FAILS
    return NO_EVIDENCE


def solver_comparisons(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from trainer.evaluate import EvalResult, compare

    results = {arm: EvalResult.from_json(r["eval"]) for arm, r in records.items()}
    goals = [
        ("A", "base", "A better than base on gold NLL (the positive control: real data moves it)"),
        ("B", "A", "B not worse than A on gold NLL (the factory's data as good as real data)"),
        ("C", "base", "C better than base on gold NLL (the loop improves a real model)"),
        ("C", "C0", "C better than C0 on gold NLL (what verification is worth)"),
    ]
    out = []
    for a, b, goal in goals:
        if a not in results or b not in results:
            missing = " and ".join(x for x in (a, b) if x not in results)
            out.append(
                {"goal": goal, "a": a, "b": b, "status": NOT_RUN, "note": f"{missing} not run"}
            )
            continue
        paired = compare(results[a], results[b], names=(a, b)).gold_nll
        out.append(
            {
                "goal": goal,
                "a": a,
                "b": b,
                "measure": "gold NLL per token, A - B",
                "paired": paired.to_json() if paired else None,
                "status": goal_status(paired, "a_lower"),
            }
        )
    return out


def em_comparison(arms: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from trainer import stats

    out = []
    for key, label in (
        ("heldout", "given the annotation rationale"),
        ("heldout_own", "given each arm's own kind of rationale"),
    ):
        a, b = arms.get("q_phi"), arms.get("annotation")
        if a is None or b is None or key not in a or key not in b:
            continue
        paired = stats.paired_ratio(
            ([x for x, _ in a[key]], [n for _, n in a[key]]),
            ([x for x, _ in b[key]], [n for _, n in b[key]]),
            measure=f"held-out problem NLL per token {label}",
            higher_is_better=False,
            names=("q_phi", "annotation"),
        )
        status = goal_status(paired, "a_lower")
        out.append(
            {
                "goal": f"EM arm (i) q_φ rationales at or below (ii) annotation rationales, "
                f"held-out problem NLL {label}",
                "a": "q_phi",
                "b": "annotation",
                "measure": f"held-out problem NLL per token {label}, A - B",
                "paired": paired.to_json(),
                "status": status,
                "primary": key == "heldout",
            }
        )
    return out


def em_summary(arm: dict[str, Any], key: str) -> dict[str, Any]:
    from trainer import stats

    nll, tokens = [x for x, _ in arm[key]], [n for _, n in arm[key]]
    low, high = stats.ratio_interval(nll, tokens)
    return {"nll_per_token": sum(nll) / sum(tokens), "interval": [low, high], "tokens": sum(tokens)}


def solver_summary(record: dict[str, Any]) -> dict[str, Any]:
    e = record["eval"]
    return {
        "examples": record["examples"],
        "optimizer_steps": record["optimizer_steps"],
        "train_loss_first": record["train_loss_first"],
        "train_loss_last": record["train_loss_last"],
        "gold_items": e["gold_items"],
        "gold_nll_per_token": e["gold_nll_per_token"],
        "gold_nll_interval": e["gold_nll_interval"],
    }


def table(report: dict[str, Any]) -> str:
    f = report["factory"]
    lines = [
        f"Factory {f['folder']}: {f['candidates_with_rollouts']} candidates with rollouts (of "
        f"{f['candidates_written']} written), {f['accepted']} accepted by the designer "
        f"reference, {f['verified_traces']} verified traces; verdicts {f['reasons']}",
        f"Solver arms: gold-solution NLL per token on the first {report['budget']['eval_items']} "
        f"items of GSM8K test's fixed subset ({report['budget']['solver_steps']} optimiser steps "
        "each)",
        f"  {'arm':<6} {'examples':>8} {'gold NLL':>9}  95% interval",
    ]
    for arm, s in report["solver"].items():
        low, high = s["gold_nll_interval"]
        lines.append(
            f"  {arm:<6} {s['examples']:>8} {s['gold_nll_per_token']:>9.4f}  {low:.4f}-{high:.4f}"
        )
    if report.get("em"):
        em = report["em"]
        lines += [
            f"EM arms: p_θ held-out problem NLL per token on {em['heldout_seeds']} held-out "
            f"seeds ({report['budget']['em_steps']} M-step optimiser steps on "
            f"{em['m_step_seeds']} seeds)",
            f"  {'arm':<11} {'z = annotation':>15}  95% interval    {'z = own kind':>13}"
            "  95% interval",
        ]
        for arm, s in em["summary"].items():
            a, o = s["heldout"], s.get("heldout_own")
            lines.append(
                f"  {arm:<11} {a['nll_per_token']:>15.4f}  {a['interval'][0]:.4f}-"
                f"{a['interval'][1]:.4f}  "
                + (
                    f"{o['nll_per_token']:>13.4f}  {o['interval'][0]:.4f}-{o['interval'][1]:.4f}"
                    if o
                    else f"{'not measured':>13}"
                )
            )
    lines.append("Goals (paired 95% intervals of A - B; lower is better):")
    for g in report["goals"]:
        p = g.get("paired")
        figures = (
            f"{p['a']:.4f} vs {p['b']:.4f}, diff {p['difference']:+.4f} "
            f"({p['low']:+.4f} to {p['high']:+.4f})"
            if p
            else g.get("note", "")
        )
        lines.append(f"  [{g['status']}] {g['goal']}: {figures}")
    lines.append(f"wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if report.get("solver"):
        panels.append(("solver", "gold-solution NLL per token (GSM8K test)"))
    if report.get("em", {}).get("summary"):
        panels.append(("em", "held-out problem NLL per token (p_θ)"))
    if not panels:  # no arm measured yet: nothing to draw
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels):
        if kind == "solver":
            names = list(report["solver"])
            values = [report["solver"][a]["gold_nll_per_token"] for a in names]
            intervals = [report["solver"][a]["gold_nll_interval"] for a in names]
        else:
            names = list(report["em"]["summary"])
            values = [report["em"]["summary"][a]["heldout"]["nll_per_token"] for a in names]
            intervals = [report["em"]["summary"][a]["heldout"]["interval"] for a in names]
        errors = [
            [v - lo for v, (lo, _) in zip(values, intervals)],
            [hi - v for v, (_, hi) in zip(values, intervals)],
        ]
        ax.bar(names, values, yerr=errors, capsize=4, color="#5b8db8")
        low = min(lo for lo, _ in intervals)
        high = max(hi for _, hi in intervals)
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
        ax.set_title(title, fontsize=10)
    fig.suptitle("bench.experiment: arms with 95% bootstrap intervals", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_settings(out: Path) -> Any:
    from promptcot.settings import Settings

    return Settings(
        trainer={"profile": "cpu", "checkpoint_dir": str(out / "no-checkpoints")},
        metrics={"port": 0},
    )


def run(
    settings: Any,
    factory: Path,
    out: Path,
    budget: Budget,
    em: bool = True,
    log: Any = None,
    solver_arms: tuple[str, ...] = SOLVER_ARMS,
    em_arms: tuple[str, ...] = ("cold_start", *EM_ARMS),
    own_z: bool = True,
) -> dict[str, Any]:
    """The experiment (``solver_arms`` and, with ``em``, the EM arms); writes
    ``out/report.json`` and ``out/report.png``."""
    from transformers import AutoTokenizer

    from llm.roles import Role, model_path_for

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    settings = settings.model_copy(deep=True)
    settings.trainer.seed = budget.seed
    if settings.trainer.torch_threads:
        import torch

        torch.set_num_threads(settings.trainer.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path_for(settings.models, Role.SOLVER), local_files_only=True
    )
    data = factory_data(settings, factory, tokenizer)
    say(f"factory: {data.summary()}")
    (out / "examples.json").write_text(
        json.dumps({"C": data.verified_ids, "C0": data.unverified_ids, **data.summary()}, indent=1)
    )
    examples = solver_examples(
        data, tokenizer, budget.solver_steps * settings.trainer.sft.batch_size
    )
    records: dict[str, dict[str, Any]] = {}
    for arm in SOLVER_ARMS:
        kept = out / f"solver-{arm}.json"
        if arm not in solver_arms:
            if kept.is_file():  # run before (another invocation): reported with the rest
                records[arm] = json.loads(kept.read_text())
            continue
        if arm != "base" and not examples[arm]:
            say(f"solver arm {arm}: no examples, not run")
            continue
        say(f"solver arm {arm}: {len(examples[arm])} examples ...")
        records[arm] = run_solver_arm(settings, arm, examples[arm], budget, out)
        say(f"solver arm {arm}: gold NLL {records[arm]['eval']['gold_nll_per_token']:.4f}")
    report: dict[str, Any] = {
        "budget": asdict(budget),
        "settings": {
            "solver_sft": settings.trainer.sft.model_dump(mode="json", exclude={"window"}),
            "m_step": settings.trainer.m_step.model_dump(mode="json", exclude={"window"}),
            "dtype": settings.trainer.dtype,
        },
        "factory": {"folder": str(factory), **data.summary()},
        "solver": {arm: solver_summary(r) for arm, r in records.items()},
        "solver_runs": records,
    }
    goals = solver_comparisons(records)
    if em:
        say("EM arms ...")
        info = run_em_arms(settings, factory, budget, out, em_arms, own_z)
        info["summary"] = {
            arm: {key: em_summary(r, key) for key in ("heldout", "heldout_own") if key in r}
            for arm, r in info["arms"].items()
        }
        report["em"] = info
        goals += em_comparison(info["arms"])
    report["goals"] = goals
    report["wall_s"] = round(time.monotonic() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "report.png")
    return report


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """``python -m bench --case experiment``: the goals as rows (quick: a tiny budget)."""
    out = ROOT / "bench-out" / ("experiment-quick" if quick else "experiment")
    budget = Budget(2, 2, 10, 8, 8) if quick else Budget()
    report = run(default_settings(out), ROOT / "bench-out" / "reference", out, budget)
    print(table(report))
    rows = []
    for g in report["goals"]:
        p = g.get("paired") or {}
        rows.append(
            {
                "case": CASE,
                "name": g["goal"],
                "value": p.get("difference"),
                "unit": "nats/token",
                "goal": "interval < 0",
                "ok": {HOLDS: True, FAILS: False}.get(g["status"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/experiment"))
    parser.add_argument("--factory", type=Path, default=Path("bench-out/reference"))
    defaults = Budget()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    parser.add_argument("--no-em", action="store_true", help="the solver arms only")
    parser.add_argument(
        "--solver-arms",
        default=",".join(SOLVER_ARMS),
        help="the solver arms to run, comma-separated (each arm kept in --out is reused)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--em-arms",
        default=",".join(("cold_start", *EM_ARMS)),
        help="the EM arms to run, comma-separated (each arm kept in --out is reused)",
    )
    parser.add_argument(
        "--no-own-z",
        action="store_true",
        help="score the EM arms given the annotation rationale only (not also their own kind)",
    )
    args = parser.parse_args(argv)
    budget = Budget(**{k: getattr(args, k) for k in asdict(defaults)})
    settings = default_settings(args.out)
    if args.threads:
        settings.trainer.torch_threads = args.threads
    arms = tuple(a for a in SOLVER_ARMS if a in args.solver_arms.split(","))
    em_arms = tuple(a for a in ("cold_start", *EM_ARMS) if a in args.em_arms.split(","))
    report = run(
        settings,
        args.factory,
        args.out,
        budget,
        em=not args.no_em,
        solver_arms=arms,
        em_arms=em_arms,
        own_z=not args.no_own_z,
    )
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
