"""Cost of the trainer's windows on CPU (the tiny test model): a DPO window against plain TRL
doing the same DPO training (the window's own share: preference margins before and after, the
checkpoint write, the bookkeeping; goal <= 1.5x), and an EM window (E-step SFT of q_φ, greedy
M-step decode, M-step SFT of p_θ, checkpoint writes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.harness import ROOT, Row, ratios, timing
from streams.records import PreferencePair, Rationale
from trainer.dpo import DPOTrainerLoop
from trainer.em import EMTrainer
from trainer.settings import TrainerSettings

CASE = "trainer (tiny model)"
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


def plain_trl_dpo(model_path: str, rows: list[dict[str, str]], settings: TrainerSettings) -> float:
    """The same DPO training, TRL called plainly: same model (with the same LoRA adapter when the
    profile trains one), rows and arguments, no margins, no checkpoint, no bookkeeping. Seconds
    of DPOTrainer construction + train()."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trainer.role_models import apply_lora_setting, normalize_end_of_turn
    from trainer.sft import common_training_args

    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    normalize_end_of_turn(tokenizer)
    cfg = settings.dpo
    model = apply_lora_setting(model, cfg.use_lora, cfg.lora)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        started = time.perf_counter()
        args = DPOConfig(
            **common_training_args(
                cfg, len(rows), settings.seed, out, model=model, dtype=settings.dtype
            ),
            beta=cfg.beta,
            max_length=cfg.max_seq_len,
            precompute_ref_log_probs=True,
            dataset_num_proc=None,
        )
        DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        ).train()
        return time.perf_counter() - started


def measure(quick: bool = False) -> list[Row]:
    """A DPO window (margins before and after, TRL DPO, checkpoint write) vs plain TRL DPO on the
    same pairs and arguments, and an EM window, on the tiny test model; interleaved runs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import tiny_model_dir

    from trainer.dpo import dpo_rows

    model = str(tiny_model_dir())
    n_pairs, n_seeds, runs = (4, 2, 3) if quick else (8, 4, 3)
    step = {"batch_size": 4, "per_device_batch_size": 4, "max_seq_len": 512, "lr": 1e-4}
    window, plain, em_s = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            settings = TrainerSettings(
                checkpoint_dir=Path(tmp),
                heldout_fraction=0.0,
                torch_threads=2,
                # Every window trains, however small (the EM trainer applies min_records).
                e_step={**step, "window": {"min_records": 1}},
                m_step={**step, "max_rationale_tokens": 32},
                dpo={**step, "window": {"min_records": 1}},
            )
            loop = DPOTrainerLoop(settings, model)
            rows = dpo_rows(loop.solver.tokenizer, pairs(n_pairs))  # loads the model, untimed
            t0 = time.perf_counter()
            loop.run_window(pairs(n_pairs))
            window.append(time.perf_counter() - t0)
            plain.append(plain_trl_dpo(model, rows, settings))
            em = EMTrainer(settings, {"prompt_model": model, "rationale_model": model})
            em.model("prompt_model", settings.m_step)
            em.model("rationale_model", settings.e_step)
            t0 = time.perf_counter()
            em.run_window(rationales(n_seeds, 2))
            em_s.append(time.perf_counter() - t0)
    return [
        timing(
            CASE,
            f"DPO window / plain TRL DPOTrainer, seconds ({n_pairs} pairs)",
            ratios(window, plain),
            "x",
            at_most=1.5,
        ),
        timing(CASE, "DPO window (margins, TRL DPO, checkpoint)", window, "s"),
        timing(CASE, "plain TRL DPOTrainer (construct + train)", plain, "s"),
        timing(
            CASE, f"EM window ({n_seeds} seeds x 2 samples: E-step, M-step decode + SFT)", em_s, "s"
        ),
    ]
