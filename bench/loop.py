"""The training-loop experiment: the factory on its embedded default (SmolLM2-135M in every role,
the trainer's cpu profile) runs for a given time, then every model version it produced is
measured side by side, and a report is written (JSON + PNG plots).

    python -m bench.loop --duration 2h                  # the experiment (2 cores: ~2.5 h in all)
    python -m bench.loop --duration 10m --out /tmp/l    # a short validation run
    python -m bench.loop --quick                        # the cold start alone (no live run)

The live run is `promptcot up` itself (a subprocess, against a broker this script owns, so the
topics outlive it). Per model version it reports:

- p_θ: yield, i.e. well-formed candidates per concept set, on a fixed set of concept sets (the
  generate stage with that version, same seeds for every version), and the held-out problem
  NLL the trainer measured on its fixed held-out seeds (trainer/heldout.py);
- q_φ: the mean reward of its greedy rationales on held-out seeds (under the p_θ of its time);
- the solver: the DPO margin on held-out pairs, and on the first N items of GSM8K test's fixed
  subset (trainer/evaluate.py) its accuracy and the NLL per token of the gold solutions;
- live: concept sets, well-formed candidates and verified problems per generator version served,
  and verified problems per hour.

Goals (2 cores, 2 hours): yield >= 2x the base model's; held-out NLL falls over >= 3 EM
iterations; the last solver better than the base on the same GSM8K-test items, paired (accuracy:
McNemar's exact test; gold-solution NLL: paired bootstrap), each at 95% ("no evidence of a
difference" otherwise, a tie included). ``--quick`` measures what the cold start
alone does: annotate's success rate on the seeds the loop uses, and the yield (1 - the format
rejection rate of generate) of the base p_θ vs the cold-started one.

``measure(quick)`` returns the figures as rows for ``python -m bench`` (case "loop").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASE = "loop"
ROLES = ("prompt_model", "rationale_model", "solver")
# A served version as the backends stamp it on lineage: "<folder>@<hash>", the folder of a
# checkpoint being "v0007-m_step"; an adapter is "<base>@<hash>+lora:v0007-m_step@<hash>".
_SERVED = re.compile(r"(?:^|[:/])v(\d{4,})-(\w+)@")


def served_version(stamp: str) -> int:
    """The checkpoint number in a backend's version stamp (0: a base model)."""
    found = _SERVED.findall(stamp or "")
    return int(found[-1][0]) if found else 0


def row(name: str, value: Any, unit: str, goal: str | None = None, ok: bool | None = None):
    return {"case": CASE, "name": name, "value": value, "unit": unit, "goal": goal, "ok": ok}


# ---------------------------------------------------------------------------------------------
# The live run


def bench_settings(out: Path, namespace: str, bootstrap: str | None = None, **extra: Any):
    """The embedded default, with this run's state under ``out`` and every version kept."""
    from promptcot.settings import load_settings

    values: dict[str, Any] = {
        "kafka": {
            "namespace": namespace,
            **({"bootstrap_servers": bootstrap} if bootstrap else {}),
        },
        "trainer": {"checkpoint_dir": str(out / "checkpoints"), "keep_last": 10_000},
        "sink": {"output_dir": str(out / "output")},
        "vectorstore": {"store": {"uri": str(out / "lancedb")}},
        "metrics": {"port": 0},
    }
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value}
    return load_settings(**values)


def live_run(out: Path, duration_s: float, seeds: int) -> dict[str, Any]:
    """`promptcot up` for ``duration_s`` against a broker owned here; the records of the run."""
    from streams.broker import EmbeddedBroker
    from streams.clients import read_raw
    from streams.serde import RecordDecodeError, decode
    from streams.topics import CATALOGUE

    namespace = f"loop{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker() as broker:
        settings = bench_settings(out, namespace, broker.bootstrap_servers)
        env = {
            **os.environ,
            "PROMPTCOT_KAFKA__NAMESPACE": namespace,
            "PROMPTCOT_TRAINER__CHECKPOINT_DIR": str(out / "checkpoints"),
            "PROMPTCOT_TRAINER__KEEP_LAST": "10000",
            "PROMPTCOT_SINK__OUTPUT_DIR": str(out / "output"),
            "PROMPTCOT_VECTORSTORE__STORE__URI": str(out / "lancedb"),
            "PROMPTCOT_METRICS__PORT": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            sys.executable,
            "-m",
            "promptcot",
            "up",
            "--bootstrap",
            broker.bootstrap_servers,
            "--duration",
            f"{int(duration_s)}s",
            "--max-problems",
            "1000000",
            "--seeds",
            str(seeds),
        ]
        started = time.time()
        run_up(command, env, out / "up.log")
        ended = time.time()
        records: dict[str, list[Any]] = {}
        for topic in ("candidates", "verdicts", "models", "rationales", "pairs"):
            spec = CATALOGUE[topic]
            decoded = []
            for message in read_raw(
                settings.kafka,
                broker.bootstrap_servers,
                spec.full_name(namespace),
                idle_s=2.0,
            ):
                try:
                    decoded.append(decode(message.value, spec.record))
                except RecordDecodeError:
                    continue
            records[topic] = decoded
    return {"started": started, "ended": ended, "records": records}


class UpFailed(RuntimeError):
    """`promptcot up` of the live run exited non-zero: nothing after it would mean anything."""


def run_up(command: list[str], env: dict[str, str], log_path: Path) -> None:
    """Run ``command`` (`promptcot up`) with its output in ``log_path``; UpFailed if it fails."""
    with open(log_path, "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise UpFailed(f"promptcot up exited with code {done.returncode}: see {log_path}")


def live_yield(records: dict[str, list[Any]], seconds: float) -> dict[str, Any]:
    """Per generator version served: concept sets settled, well-formed candidates, verified."""
    per: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    generator_of: dict[str, int] = {}
    for c in records["candidates"]:
        v = served_version(c.generator)
        generator_of[c.id] = v
        per[v]["concept_sets"] += 1
        per[v]["well_formed"] += 1
    verified = 0
    for v in records["verdicts"]:
        if v.stage == "generate":
            per[served_version(v.lineage.models.get("prompt_model", ""))]["concept_sets"] += 1
        elif v.stage == "verify" and v.accepted:
            verified += 1
            per[generator_of.get(v.subject_id, 0)]["verified"] += 1
    return {
        "by_prompt_model_version": {
            str(k): {
                **dict(d),
                "well_formed_per_concept_set": d["well_formed"] / max(1, d["concept_sets"]),
            }
            for k, d in sorted(per.items())
        },
        "verified": verified,
        "verified_per_hour": verified / max(seconds, 1e-9) * 3600,
    }


# ---------------------------------------------------------------------------------------------
# Measuring versions side by side


def fixed_concept_sets(n: int, seed: int = 7) -> list[Any]:
    """The same n concept sets for every version (the sampler, its own seed)."""
    from promptcot.settings import Settings
    from workers.concepts import ConceptSampler, load_pool

    cfg = Settings().concepts.model_copy(update={"seed": seed})
    sampler = ConceptSampler(load_pool(cfg.pool_path), cfg)
    return [sampler.sample("math") for _ in range(n)]


def offline_yield(settings: Any, model_path: str, concept_sets: list[Any]) -> float:
    """Well-formed candidates per concept set from the generate stage with this p_θ."""
    from llm.backends import BackendSettings
    from llm.backends.pool import new_backend
    from llm.roles import Role
    from streams.topics import CANDIDATES
    from workers.stages.generate import GenerateStage

    backend = new_backend(BackendSettings(model=model_path, max_batch_size=8))
    try:
        stage = GenerateStage(settings, backends={Role.PROMPT_MODEL: backend})
        emits = stage.process(concept_sets)
    finally:
        backend.close()
    return sum(e.topic is CANDIDATES for e in emits) / len(concept_sets)


def versions(settings: Any) -> dict[str, list[dict[str, Any]]]:
    """role -> [{version, step, path, metrics}] from the checkpoint store, oldest first."""
    from trainer.checkpoints import CheckpointStore

    store = CheckpointStore(settings.trainer.checkpoint_dir)
    return {
        role: [
            {
                "version": c.version,
                "step": c.step,
                "path": str(c.path),
                "metrics": c.metadata.get("metrics", {}),
            }
            for c in store.list(role)
        ]
        for role in ROLES
    }


def spaced(items: list[Any], most: int) -> list[Any]:
    """At most ``most`` (>= 2) items, evenly spaced, always the first and the last."""
    if most < 2:
        raise ValueError(f"most must be at least 2 (the first and the last), not {most}")
    if len(items) <= most:
        return items
    step = (len(items) - 1) / (most - 1)
    return [items[round(i * step)] for i in range(most)]


def measure_versions(
    settings: Any, concept_sets: int, eval_limit: int, most: int
) -> dict[str, list[dict[str, Any]]]:
    from llm.roles import model_path_for
    from trainer.evaluate import evaluate_path
    from trainer.settings import EvalConfig

    found = versions(settings)
    sets = fixed_concept_sets(concept_sets)
    base_p = model_path_for(settings.models, "prompt_model")
    base_solver = model_path_for(settings.models, "solver")
    p_rows = [{"version": 0, "step": "base", "path": base_p, "metrics": {}}] + found["prompt_model"]
    for r in spaced(p_rows, most):
        r["yield"] = offline_yield(settings, r["path"], sets)
    s_rows = [{"version": 0, "step": "base", "path": base_solver, "metrics": {}}] + found["solver"]
    cfg = EvalConfig(limit=eval_limit, max_tokens=256, batch_size=8)
    for r in spaced(s_rows, most):
        result = evaluate_path(r["path"], cfg, role="solver")
        r["gsm8k_accuracy"] = result.accuracy
        r["gsm8k_gold_nll"] = result.gold_nll_per_token
        r["eval"] = result.to_json()  # per item: the base and the last version are paired
    q_rows = [{"version": 0, "step": "base", "path": "", "metrics": {}}] + found["rationale_model"]
    return {"prompt_model": p_rows, "rationale_model": q_rows, "solver": s_rows}


def metric(r: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        if key in r.get("metrics", {}):
            return float(r["metrics"][key])
    return None


def goals(by_role: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    p, solver = by_role["prompt_model"], by_role["solver"]
    yields = [r for r in p if "yield" in r]
    base_yield, last_yield = yields[0]["yield"], yields[-1]["yield"]
    ratio = last_yield / base_yield if base_yield else (float("inf") if last_yield else 0.0)
    nll = [
        (r["version"], metric(r, "heldout_problem_nll_after"))
        for r in p
        if metric(r, "heldout_problem_nll_after") is not None
    ]
    first = p[1:2] and metric(p[1], "heldout_problem_nll_before")  # the base's NLL on the pool
    nll_start = first if first is not None else (nll[0][1] if nll else None)
    nll_end = nll[-1][1] if nll else None
    # The goal is about EM: from p_θ before its first M-step (after the cold start, which alone
    # lowers the NLL a lot) to p_θ after its last one.
    m_steps = [r for r in p if r["step"] == "m_step"]
    em = [r for r in m_steps if metric(r, "heldout_problem_nll_after") is not None]
    em_start = metric(em[0], "heldout_problem_nll_before") if em else None
    em_end = metric(em[-1], "heldout_problem_nll_after") if em else None
    falls = bool(len(em) >= 3 and em_start is not None and em_end < em_start)
    lowest = min(em, key=lambda r: metric(r, "heldout_problem_nll_after"), default=None)
    return [
        row("yield: well-formed candidates per concept set, base p_θ", base_yield, "ratio"),
        row("yield: well-formed candidates per concept set, last p_θ", last_yield, "ratio"),
        row("yield, last p_θ / base", ratio, "x", ">= 2x", ratio >= 2.0),
        row("EM iterations (M-steps)", len(m_steps), "count", ">= 3", len(m_steps) >= 3),
        row(
            f"held-out problem NLL, base -> last ({len(nll)} versions, cold start included)",
            [nll_start, nll_end],
            "nats/token",
        ),
        row(
            f"held-out problem NLL over the EM iterations (before the first M-step -> after "
            f"the last, {len(em)} M-steps)",
            [em_start, em_end],
            "nats/token",
            "falls over >= 3 EM iterations",
            falls,
        ),
        row(
            "lowest held-out problem NLL after an M-step (version)",
            [metric(lowest, "heldout_problem_nll_after"), lowest["version"]] if lowest else None,
            "nats/token",
        ),
        *solver_goals(solver),
    ]


def solver_goals(solver: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last solver version against the base on the same GSM8K-test items, paired
    (trainer/evaluate.py ``compare``): accuracy by McNemar's exact test, the gold solutions' NLL
    per token by the paired bootstrap. A goal holds only when the last version is better with
    95% confidence; a tie reads "no evidence of a difference", never "not below"."""
    from trainer.evaluate import EvalResult, compare

    measured = [r for r in solver if "eval" in r]
    names = {"accuracy": "accuracy", "gold": "gold-solution NLL per token"}
    if len(measured) < 2:
        return [
            row(f"solver GSM8K-test {what}, last vs base", None, unit, f"last better: {why}", False)
            for what, unit, why in (
                (names["accuracy"], "share", "no solver version past the base"),
                (names["gold"], "nats/token", "no solver version past the base"),
            )
        ]
    base, last = (EvalResult.from_json(r["eval"]) for r in (measured[0], measured[-1]))
    c = compare(last, base, names=("last", "base"))
    rows = []
    for what, paired, unit, method in (
        (names["accuracy"], c.accuracy, "share", "McNemar exact"),
        (names["gold"], c.gold_nll, "nats/token", "paired bootstrap"),
    ):
        value = (
            {
                "base": paired.b,
                "last": paired.a,
                "last - base": paired.difference,
                "interval": [paired.low, paired.high],
                "p": paired.p_value,
                "verdict": paired.verdict,
            }
            if paired
            else None
        )
        rows.append(
            row(
                f"solver GSM8K-test {what}, last (v{measured[-1]['version']}) vs base, "
                f"paired on {c.n} items",
                value,
                unit,
                f"last better ({method}, 95%)",
                bool(paired and paired.verdict == "last better"),
            )
        )
    return rows


def plot(by_role: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("p_θ yield (well-formed / concept set)", "prompt_model", lambda r: r.get("yield")),
        (
            "p_θ held-out problem NLL",
            "prompt_model",
            lambda r: metric(r, "heldout_problem_nll_after"),
        ),
        ("q_φ held-out reward", "rationale_model", lambda r: metric(r, "heldout_reward_after")),
        (
            "solver DPO margin, held-out pairs",
            "solver",
            lambda r: metric(r, "heldout_margin_after"),
        ),
        ("solver GSM8K-test accuracy", "solver", lambda r: r.get("gsm8k_accuracy")),
        ("solver gold-solution NLL (GSM8K test)", "solver", lambda r: r.get("gsm8k_gold_nll")),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, role, value) in zip(axes, panels):
        points = [(r["version"], value(r)) for r in by_role[role]]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{role} version (0: base)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The two measurements


def measure_cold_start(out: Path, concept_sets: int = 40, seeds: int = 128) -> list[dict[str, Any]]:
    """Annotate's success rate on the loop's seeds and all GSM8K train seeds; yield of the base
    p_θ vs the cold-started one on the same concept sets."""
    from llm.roles import model_path_for
    from promptcot.startup import up_seeds
    from streams.topics import SEEDS_ANNOTATED
    from trainer.coldstart import cold_start
    from trainer.em import EMTrainer
    from workers.seeds import load_seeds
    from workers.stages.annotate import AnnotateStage

    settings = bench_settings(out, "loop-quick")
    rows = []
    stage = AnnotateStage(settings)
    for label, shipped in (
        (f"the {seeds} seeds `promptcot up` publishes", up_seeds(settings, ["em"], seeds)),
        ("all", load_seeds("gsm8k", "train")),
    ):
        emits = stage.process(shipped)
        rate = sum(e.topic is SEEDS_ANNOTATED for e in emits) / len(shipped)
        rows.append(row(f"annotate success, GSM8K train, {label} ({len(shipped)})", rate, "share"))
        rows[-1].update(goal=">= 0.9", ok=rate >= 0.9)
    trainer = EMTrainer.on_models(settings.trainer, settings.models)
    started = time.monotonic()
    done = cold_start(settings, trainer)
    if done is None:
        raise SystemExit(f"{out} holds cold-started models already: measure in a fresh folder")
    data = done.data
    rows.append(row("cold start (both models), wall time", time.monotonic() - started, "s"))
    sets = fixed_concept_sets(concept_sets)
    base = offline_yield(settings, model_path_for(settings.models, "prompt_model"), sets)
    cold = offline_yield(settings, str(trainer.store.latest("prompt_model").path), sets)
    rows += [
        row(
            f"generate format rejections, base p_θ ({concept_sets} concept sets)", 1 - base, "share"
        ),
        row(
            f"generate format rejections, cold-started p_θ ({concept_sets} concept sets)",
            1 - cold,
            "share",
            "<= 0.2",
            1 - cold <= 0.2,
        ),
    ]
    report = {
        "quick": True,
        "seeds": seeds,
        "cold_start_seeds": len(data.seeds),
        "settings": json.loads(settings.model_dump_json()),
        "figures": rows,
    }
    write_report(out, report)
    return rows


def write_report(out: Path, report: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def run_experiment(
    out: Path, duration_s: float, seeds: int, concept_sets: int, eval_limit: int, most: int
) -> list[dict[str, Any]]:
    run = live_run(out, duration_s, seeds)
    settings = bench_settings(out, "loop-measure")
    by_role = measure_versions(settings, concept_sets, eval_limit, most)
    live = live_yield(run["records"], run["ended"] - run["started"])
    rows = goals(by_role) + [
        row("verified problems per hour (live)", live["verified_per_hour"], "1/h"),
        row("model versions (p_θ, q_φ, solver)", [len(by_role[r]) - 1 for r in ROLES], "count"),
    ]
    report = {
        "duration_s": duration_s,
        "wall_s": run["ended"] - run["started"],
        "settings": json.loads(settings.model_dump_json()),
        "versions": by_role,
        "live": live,
        "figures": rows,
    }
    write_report(out, report)
    plot(by_role, out / "report.png")
    return rows


def measure(
    quick: bool = False, duration_s: float = 7200.0, out: Path | None = None
) -> list[dict[str, Any]]:
    """The figures as rows for `python -m bench` (``quick``: the cold start alone)."""
    import tempfile

    out = out or Path(tempfile.mkdtemp(prefix="promptcot-loop-"))
    if quick:
        return measure_cold_start(out)
    return run_experiment(out, duration_s, seeds=128, concept_sets=24, eval_limit=50, most=5)


def main(argv: list[str] | None = None) -> None:
    from promptcot.cli.app import parse_duration

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", default="2h", help="live run length (e.g. 2h, 10m)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/loop"), help="report folder")
    ap.add_argument("--quick", action="store_true", help="the cold start alone, no live run")
    ap.add_argument("--seeds", type=int, default=128, help="seed problems of the EM loop")
    ap.add_argument("--concept-sets", type=int, default=24, help="fixed sets for the yield")
    ap.add_argument(
        "--eval-limit", type=int, default=50, help="first N of the GSM8K-test subset per solver"
    )
    ap.add_argument("--versions", type=int, default=5, help="most versions measured per role")
    args = ap.parse_args(argv)
    if args.versions < 2:
        ap.error("--versions must be at least 2: the base and the last version are compared")
    try:
        if args.quick:
            rows = measure_cold_start(args.out, args.concept_sets, args.seeds)
        else:
            rows = run_experiment(
                args.out,
                parse_duration(args.duration),
                args.seeds,
                args.concept_sets,
                args.eval_limit,
                args.versions,
            )
    except UpFailed as e:
        raise SystemExit(f"error: {e}") from None
    for r in rows:
        mark = "" if r["ok"] is None else ("  ok" if r["ok"] else "  MISSED")
        goal = f"  (goal {r['goal']})" if r["goal"] else ""
        print(f"{r['name']}: {r['value']} {r['unit']}{goal}{mark}")
    print(f"report: {args.out / 'report.json'}")


if __name__ == "__main__":
    main()
