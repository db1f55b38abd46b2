"""Cost of one trainer window on CPU: an EM window (E-step SFT of q_φ, greedy M-step decode,
M-step SFT of p_θ, checkpoint writes) and a DPO window, with the metrics they report.

    python bench/trainer.py --model /path/to/hf-folder      # any local HF causal-LM folder
    python bench/trainer.py --smollm2                       # the embedded SmolLM2-135M
    python bench/trainer.py --model DIR --seeds 4 --samples 2 --pairs 4 --json out.json

Paper learning rates are the defaults; ``--lr`` overrides all of them (a tiny random model
needs ~1e-3 to move visibly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from streams.records import PreferencePair, Rationale
from trainer.config import TrainerSettings
from trainer.dpo import DPOTrainerLoop
from trainer.em import EMTrainer

NAMES = ["Ana", "Ben", "Carla", "Dev", "Eva", "Femi", "Gus", "Hana"]


def rationales(n_seeds: int, k: int) -> list[Rationale]:
    out = []
    for i in range(n_seeds):
        problem = (
            f"{NAMES[i % 8]} has {i + 2} boxes with {i + 3} pencils in each box. How many pencils?"
        )
        for s in range(k):
            out.append(
                Rationale(
                    seed_id=f"bench_seed_{i}",
                    domain="math",
                    concepts=["multiplication as repeated addition", "equal groups", "counting"],
                    problem=problem,
                    text=f"Combine equal groups with multiplication: {i + 2} boxes of {i + 3} "
                    "pencils, "
                    f"ask for the total (variant {s}).",
                    sample_index=s,
                    reward=-40.0 - s,
                    logp_problem=-25.0,
                    logp_rationale=-15.0 - s,
                    rationale_model="bench",
                    prompt_model="bench",
                )
            )
    return out


def pairs(n: int) -> list[PreferencePair]:
    return [
        PreferencePair(
            problem_id=f"bench_prob_{i}",
            domain="math",
            prompt=f"{NAMES[i % 8]} has {i + 2} apples and gets {i + 3} more. How many apples?",
            chosen=f"We add {i + 2} and {i + 3}.\nThe answer is \\boxed{{{2 * i + 5}}}.",
            rejected=f"Apples are red.\nThe answer is \\boxed{{{i}}}.",
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="local HF folder")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--max-rationale-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.smollm2:
        from workers.models import prepare_smollm2

        model = str(prepare_smollm2())
    elif args.model:
        model = args.model
    else:
        ap.error("--model or --smollm2")

    lr = {"lr": args.lr} if args.lr else {}
    step = {"batch_size": 4, "per_device_batch_size": 4, "max_seq_len": 512, **lr}
    results: dict[str, object] = {"model": model, "seeds": args.seeds, "samples": args.samples}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        settings = TrainerSettings(
            checkpoint_dir=Path(tmp),
            heldout_fraction=0.0,
            torch_threads=args.threads,
            e_step=step,
            m_step={**step, "max_rationale_tokens": args.max_rationale_tokens},
            dpo={**step, "window": {"min_records": 1}},
        )
        t0 = time.perf_counter()
        em = EMTrainer(settings, {"prompt_model": model, "rationale_model": model})
        em.model("prompt_model", settings.m_step)
        em.model("rationale_model", settings.e_step)
        results["load_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        window = em.run_window(rationales(args.seeds, args.samples))
        results["em_window_s"] = round(time.perf_counter() - t0, 2)
        results["em_metrics"] = {u.step: u.metrics for u in window.updates}

        t0 = time.perf_counter()
        dpo = DPOTrainerLoop(settings, model)
        _ = dpo.solver
        t1 = time.perf_counter()
        d = dpo.run_window(pairs(args.pairs))
        results["dpo_load_s"] = round(t1 - t0, 2)
        results["dpo_window_s"] = round(time.perf_counter() - t1, 2)
        results["dpo_metrics"] = d.updates[0].metrics if d.updates else d.skipped
        sizes = {
            u.role: sum(f.stat().st_size for f in Path(u.path).iterdir())
            for u in [*window.updates, *d.updates]
        }
        results["checkpoint_bytes"] = sizes
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
