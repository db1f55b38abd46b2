"""The trainer's windows on CPU under the cpu profile (docs/training.md, "The engine"): for each
window kind (DPO, solver SFT, EM) its wall time, the peak resident memory while it runs and its
losses; beside the DPO window, TRL's DPOTrainer taking the same optimiser steps on the same pairs
with the same LoRA adapter (the control arm: how the trainer trained before the engine). Every
window runs in a process of its own, its model loaded before the clock and the memory watch
start, so a peak is that window's.

    python -m bench --case trainer                       # the tiny test model, 3 runs each
    python -m bench.trainer --model smollm2 --kind dpo   # one window on SmolLM2-135M, JSON out

Windows are the cpu profile's: 8 pairs (GSM8K train problems: the worked solution against half
of it with a wrong answer), 8 traces (GSM8K worked solutions), 24 rationales (6 seeds x K=4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import ROOT, Row, not_run, ratios, row, timing
from bench.rss import PeakRSS

CASE = "trainer (cpu profile)"
KINDS = ("dpo", "sft", "em", "trl-dpo")
WINDOW = {"dpo": 8, "sft": 8, "em": 6}  # pairs, traces, seeds (x K=4 rationales)


# ---------------------------------------------------------------------------------------------
# One window, in this process


def model_dir(name: str) -> str:
    if name == "smollm2":
        from llm.smollm2 import prepare_smollm2

        return str(prepare_smollm2())
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_dir

    return str(tiny_model_dir())


def gsm8k_traces(n: int) -> list:
    from streams.records import SolverTrace
    from workers.annotation import solution_steps
    from workers.seeds import load_seeds

    return [
        SolverTrace(
            problem_id=seed.id,
            source="solver",
            domain="math",
            prompt=seed.text,
            completion="\n".join(solution_steps(seed.solution or "") or [seed.text])
            + f"\nThe answer is \\boxed{{{seed.answer}}}.",
            reference_answer=seed.answer,
        )
        for seed in load_seeds("gsm8k", "train", n, skip=100)
    ]


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``["dpo.steps_per_window=2", "gradient_checkpointing=true"]`` as a nested dict of
    trainer settings (values read as JSON where they parse, else as text)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def run_window(
    kind: str, model: str, threads: int, trainer: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One window of ``kind`` on a fresh trainer of the cpu profile (no held-out items: every
    record trains; ``trainer``: settings over the profile's), after its model is loaded."""
    import torch

    from bench.gpu_check import preference_pairs, window_rationales
    from promptcot.settings import Settings

    torch.set_num_threads(threads)
    base = model_dir(model)
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    settings = Settings(
        trainer={
            "profile": "cpu",
            "checkpoint_dir": work / "ckpt",
            "heldout_fraction": 0.0,
            "heldout_seeds": 0,
            **(trainer or {}),
        },
        metrics={"port": 0},
    )
    t = settings.trainer
    out: dict[str, Any] = {"kind": kind, "model": model}
    if kind == "trl-dpo":
        return {**out, **trl_dpo_window(base, t)}
    if kind == "dpo":
        from trainer.dpo import DPOTrainerLoop

        loop: Any = DPOTrainerLoop(t, base)
        records: Any = preference_pairs(WINDOW["dpo"])
        loop.solver  # noqa: B018  (loaded before the clock)
    elif kind == "sft":
        from trainer.traces import SolverSFTLoop

        loop = SolverSFTLoop(t, base)
        records = gsm8k_traces(WINDOW["sft"])
        loop.solver  # noqa: B018
    else:
        from trainer.coldstart import cold_start_data
        from trainer.em import EMTrainer

        seeds = cold_start_data(settings, limit=WINDOW["em"]).seeds
        loop = EMTrainer(t, {"prompt_model": base, "rationale_model": base})
        loop.model("prompt_model", t.m_step)
        loop.model("rationale_model", t.e_step)
        records = window_rationales(seeds, settings.rationale.samples)
    with PeakRSS() as rss:
        started = time.perf_counter()
        result = loop.run_window(records)
        out["wall_s"] = time.perf_counter() - started
    out.update(
        rss_loaded_mb=rss.start / 2**20, rss_peak_mb=rss.peak / 2**20, skipped=result.skipped
    )
    out["updates"] = [{"step": u.step, **u.metrics} for u in result.updates]
    return out


def trl_dpo_window(base: str, t: Any) -> dict[str, Any]:
    """TRL's DPOTrainer on the DPO window's pairs: the cpu profile's LoRA adapter, learning
    rate, batch and steps (max_steps = steps_per_window), the reference precomputed (as the
    trainer ran it before the engine), on the same rows."""
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError as exc:
        return {"error": f"TRL is not installed: {exc}"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.gpu_check import preference_pairs
    from trainer.dpo import dpo_rows
    from trainer.role_models import apply_lora_setting, normalize_end_of_turn

    cfg = t.dpo
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    normalize_end_of_turn(tokenizer)
    model = apply_lora_setting(model, cfg.use_lora, cfg.lora)
    rows = dpo_rows(tokenizer, preference_pairs(WINDOW["dpo"]))
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as work, PeakRSS() as rss:
        started = time.perf_counter()
        args = DPOConfig(
            output_dir=work,
            use_cpu=True,
            report_to="none",
            learning_rate=cfg.lr,
            per_device_train_batch_size=cfg.per_device_batch_size,
            gradient_accumulation_steps=max(1, cfg.batch_size // cfg.per_device_batch_size),
            max_steps=cfg.steps_per_window or 1,
            beta=cfg.beta,
            max_length=cfg.max_seq_len,
            precompute_ref_log_probs=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataset_num_proc=None,
        )
        result = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        ).train()
        wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "rss_loaded_mb": rss.start / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
        "updates": [{"step": "dpo", "train_loss": float(result.training_loss)}],
    }


# ---------------------------------------------------------------------------------------------
# The case: every window in a process of its own


def child(kind: str, model: str, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench.trainer", "--kind", kind, "--model", model]
        cmd += ["--threads", str(threads), "--out", out.name]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(Path(out.name).read_text())


def _loss(found: dict[str, Any], key: str) -> float:
    return float(found["updates"][-1].get(key, float("nan")))


def measure(quick: bool = False) -> list[Row]:
    """The tiny model's windows, interleaved runs of every kind (the DPO window and TRL's side by
    side)."""
    runs = 1 if quick else 3
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for _ in range(runs):
        for kind in KINDS:
            found[kind].append(child(kind, "tiny", 2))
    rows: list[Row] = []
    for kind in KINDS:
        errors = [f["error"] for f in found[kind] if "error" in f]
        if errors:
            rows.append(not_run(CASE, f"{kind}: {errors[0]}"))
            continue
        ok = found[kind]
        rows.append(timing(CASE, f"{kind} window, seconds", [f["wall_s"] for f in ok], "s"))
        rows.append(timing(CASE, f"{kind} window, peak RSS", [f["rss_peak_mb"] for f in ok], "MB"))
    dpo, trl = found["dpo"], found["trl-dpo"]
    if not any("error" in f for f in dpo):
        last = [_loss(f, "train_loss_last") for f in dpo]
        rows.append(
            row(
                CASE,
                "DPO window: last step's loss (ln 2 = 0.693)",
                statistics.median(last),
                "",
                "< 0.693",
                statistics.median(last) < 0.6931,
                last,
            )
        )
    if not any("error" in f for f in dpo + trl):
        rows.append(
            timing(
                CASE,
                "DPO window / TRL DPOTrainer, seconds (same steps)",
                ratios([f["wall_s"] for f in dpo], [f["wall_s"] for f in trl]),
                "x",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.trainer", description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, help="write the window's figures here (JSON)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a trainer setting over the cpu profile's, e.g. dpo.steps_per_window=2",
    )
    args = ap.parse_args(argv)
    found = run_window(args.kind, args.model, args.threads, overrides(args.set))
    found["settings"] = args.set
    text = json.dumps(found, indent=1, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
