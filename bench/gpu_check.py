"""Every training step of the gpu profile once, on a CUDA device, in one process and a few
minutes: the cold start on a handful of seeds, one E-step, one M-step, one DPO window and an eval
of a few GSM8K items, with a table of each step's wall time, peak GPU memory, the dtypes it
trained and computed in, where its tensors were, and its loss (docs/training.md, "Checking a
GPU").

    ops/gpu-check.sh prepare              # on the CPU machine: the wheels a CUDA image lacks
    ops/gpu-check.sh run [--large]        # on the GPU machine
    ops/gpu-check.sh run --cpu            # the same code path on CPU, tiny (the suite runs it)

The model is SmolLM2-135M's architecture and tokenizer initialised at random (its weights do not
travel): times and memory are the real model's, the losses only show that each step ran.
``--large`` adds the same run at SmolLM2-1.7B's shape, for its memory figures.

Every step is the project's own code: ``cold_start_data`` and ``EMTrainer.cold_start``,
``EMTrainer.run_window`` (its E-step and M-step are timed apart by wrapping the two methods it
calls), ``DPOTrainerLoop.run_window`` and ``evaluate_path`` with the backend the trainer evaluates
with. What the forwards ran in is observed, not read from the settings: hooks on each model's
transformer body and LM head, the two modules the training engine calls (trainer/engine.py;
generation reaches them through the top module), for the devices of their parameters, buffers,
inputs and outputs, and on its first linear layer (the weight dtype, the output dtype, autocast
on or off).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network there, and never a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import gpu_env

SMOLLM2_DIR = gpu_env.DEFAULT_DIR / "smollm2-135m"
# SmolLM2-1.7B's published shape on the 135M config (same tokenizer): ~1.7B parameters.
LARGE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
# --cpu: the tiny model's tokenizer on an even smaller network, and short decodes (these CPUs
# emulate bf16, which the gpu profile computes in): the same code path in well under a minute.
CPU_OVERRIDES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CPU_DECODE_TOKENS = 16
SYMBOL = {"prompt_model": "p", "rationale_model": "q", "solver": "s"}


@dataclass(frozen=True)
class Sizes:
    seeds: int  # cold-start seeds
    heldout: int  # held-out seeds the signals are measured on
    window_seeds: int  # seeds of the EM window, K rationales each (gpu: 8 x 8, its 64 records)
    pairs: int  # preference pairs of the DPO window
    eval_items: int  # GSM8K test problems scored


SIZES = {
    "gpu": Sizes(seeds=16, heldout=8, window_seeds=8, pairs=32, eval_items=8),
    "cpu": Sizes(seeds=4, heldout=2, window_seeds=2, pairs=6, eval_items=2),
}


# ---------------------------------------------------------------------------------------------
# What each step is measured by


@dataclass
class StepRecord:
    model: str
    step: str
    wall_s: float = 0.0
    peak_gib: float | None = None  # torch.cuda.max_memory_allocated during the step
    held_gib: float | None = None  # torch.cuda.memory_allocated after it
    trained: list[str] = field(default_factory=list)  # dtypes of the weights it trained
    # (mode, weight dtype, output dtype, autocast dtype or "off") of the first layer's first
    # projection
    matmuls: list[tuple[str, str, str, str]] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)  # device -> tensors seen there
    misplaced: list[str] = field(default_factory=list)  # tensors not on the expected device
    loss: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class Probe:
    """Times steps and watches the models' forwards (hooks that record, never change)."""

    def __init__(self, device_type: str):
        import torch

        self.torch = torch
        self.cuda = device_type == "cuda"
        self.expect = device_type
        self.records: list[StepRecord] = []
        self.current: StepRecord | None = None
        self._checked: set[int] = set()  # models whose weights this step has checked
        self._discover: Any = None

    # -- steps --------------------------------------------------------------------------------

    @contextmanager
    def step(self, model: str, name: str) -> Iterator[StepRecord]:
        torch = self.torch
        rec = StepRecord(model, name)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.current, self._checked = rec, set()
        started = time.perf_counter()
        try:
            yield rec
        except BaseException as e:
            rec.error = (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:200]
            raise
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                rec.peak_gib = torch.cuda.max_memory_allocated() / 2**30
                rec.held_gib = torch.cuda.memory_allocated() / 2**30
            rec.wall_s = time.perf_counter() - started
            self.current = None
            self.records.append(rec)

    def wrap(self, model: str, name: str, fn: Callable, after: Callable[[StepRecord, Any], None]):
        """``fn`` measured as a step of its own each time it is called."""

        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.step(model, name) as rec:
                out = fn(*args, **kwargs)
                after(rec, out)
            return out

        return measured

    # -- forwards -----------------------------------------------------------------------------

    WATCHED = "_gpu_check_watched"  # marks a model that has the hooks

    def watch(self, model: Any) -> None:
        """Hooks on the model's body and LM head, and on its first linear layer."""
        from trainer.engine import causal_lm

        if getattr(model, self.WATCHED, False):
            return
        setattr(model, self.WATCHED, True)
        lm = causal_lm(model)
        for part in (lm.get_decoder(), lm.get_output_embeddings()):
            part.register_forward_hook(self._top_hook, with_kwargs=True)
        linear = next(m for m in model.modules() if isinstance(m, self.torch.nn.Linear))
        linear.register_forward_hook(self._matmul_hook)

    @contextmanager
    def discovering(self) -> Iterator[None]:
        """Watch models the step creates itself (the eval backend's): a global hook until the
        first causal LM forward, then that model's own hooks."""
        from torch.nn.modules.module import register_module_forward_hook

        self._discover = register_module_forward_hook(self._discover_hook)
        try:
            yield
        finally:
            if self._discover is not None:
                self._discover.remove()
                self._discover = None

    def _discover_hook(self, module: Any, args: Any, output: Any) -> None:
        if type(module).__name__.endswith("ForCausalLM") and not getattr(module, self.WATCHED, 0):
            self.watch(module)  # its body and head: their hooks see the calls after this one
            self._top_hook(module, args, {}, output)  # this first call, seen from outside
            if self._discover is not None:
                self._discover.remove()
                self._discover = None

    def _seen(self, what: str, tensor: Any) -> None:
        rec = self.current
        if rec is None:
            return
        device = str(tensor.device)
        rec.devices[device] = rec.devices.get(device, 0) + 1
        entry = f"{what} on {device}"
        if tensor.device.type != self.expect and entry not in rec.misplaced:
            rec.misplaced.append(entry)

    def _top_hook(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        rec, torch = self.current, self.torch
        if rec is None:
            return
        cls = type(module).__name__
        if id(module) not in self._checked:  # weights once per step: they do not move
            self._checked.add(id(module))
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                self._seen(f"{cls}.{name}", tensor)
        inputs = [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items())
        for name, value in inputs:
            if torch.is_tensor(value):
                self._seen(f"input {name}", value)
        outputs = output.items() if hasattr(output, "items") else [("0", output)]
        for name, value in outputs:
            if torch.is_tensor(value):
                self._seen(f"output {name}", value)

    def _matmul_hook(self, module: Any, args: Any, output: Any) -> None:
        rec, torch = self.current, self.torch
        if rec is None or not torch.is_tensor(output):
            return
        kind = module.weight.device.type
        autocast = (
            _name(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else "off"
        )
        seen = ("train" if module.training else "eval", _name(module.weight.dtype))
        entry = (*seen, _name(output.dtype), autocast)
        if entry not in rec.matmuls:
            rec.matmuls.append(entry)


def trained_dtypes(*models: Any) -> list[str]:
    return sorted({_name(p.dtype) for m in models for p in m.parameters() if p.requires_grad})


# ---------------------------------------------------------------------------------------------
# The model and the data


def random_model(source: Path, out: Path, device: str, overrides: dict[str, Any]) -> int:
    """``source``'s architecture (with ``overrides``) initialised at random on ``device`` and
    saved in bfloat16 with ``source``'s tokenizer, as the trainer loads a base model; returns
    the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gpu_env.copy_model_files(source, out)
    config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))  # config.json with the overrides
    del model
    free_memory()
    return n


def count(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def window_rationales(seeds: list, k: int) -> list:
    """K scored rationales per annotated seed, as the rationale stage sends them (the rewards
    are made up: the E-step takes the best of each seed's K, whatever their values)."""
    from streams.records import Rationale

    return [
        Rationale.derived_from(
            seed,
            seed_id=seed.seed_id,
            domain=seed.domain,
            concepts=list(seed.concepts),
            problem=seed.text,
            text=seed.rationale if i == 0 else f"{seed.rationale} (variant {i})",
            sample_index=i,
            reward=-100.0 + i,
            logp_problem=-60.0,
            logp_rationale=-40.0 + i,
            rationale_model="rationale_model/base",
            prompt_model="prompt_model/base",
        )
        for seed in seeds
        for i in range(k)
    ]


def preference_pairs(n: int) -> list:
    """Pairs on GSM8K train problems: the worked solution with its answer against the first
    half of it with a wrong one."""
    from streams.records import PreferencePair
    from workers.annotation import solution_steps, solver_gold_solution
    from workers.seeds import load_seeds

    pairs = []
    for seed in load_seeds("gsm8k", "train", n):
        steps = solution_steps(seed.solution or "") or [seed.text]
        wrong = f"{seed.answer}1"
        pairs.append(
            PreferencePair(
                problem_id=seed.id,
                domain="math",
                prompt=seed.text,
                chosen=solver_gold_solution(seed.solution or ""),
                rejected="\n".join(steps[: len(steps) // 2])
                + f"\nThe answer is \\boxed{{{wrong}}}.",
            )
        )
    return pairs


# ---------------------------------------------------------------------------------------------
# One pass: every step on one model


def check_settings(work: Path, sizes: Sizes, cpu: bool) -> Any:
    """The gpu profile, on the given sizes (``cpu``: on the cpu, with short decodes)."""
    from promptcot.settings import Settings

    def decode(key: str) -> dict[str, int]:
        return {key: CPU_DECODE_TOKENS} if cpu else {}

    return Settings(
        trainer={
            "profile": "gpu",
            "device": "cpu" if cpu else "auto",
            "checkpoint_dir": work / "checkpoints",
            "keep_last": 1,  # full checkpoints of a 1.7B model are 6.8 GB each
            "heldout_seeds": sizes.heldout,
            "cold_start": {"seeds": sizes.seeds},
            "eval": {"limit": sizes.eval_items, **decode("max_tokens")},
            "m_step": decode("max_rationale_tokens"),
        },
        metrics={"port": 0},
    )


def run_pass(probe: Probe, label: str, base: Path, sizes: Sizes, work: Path, cpu: bool) -> None:
    """The cold start, an EM window (E-step, M-step), a DPO window and an eval on the model
    folder ``base``; each step's record goes to ``probe``. Stops at the first failing step."""
    settings = check_settings(work, sizes, cpu)
    em_steps(probe, label, base, sizes, settings)
    free_memory()  # the em and dpo stages train on GPUs of their own (docs/training.md)
    dpo_steps(probe, label, base, sizes, settings)
    free_memory()


def em_steps(probe: Probe, label: str, base: Path, sizes: Sizes, settings: Any) -> None:
    """The cold start, then one EM window (its E-step and M-step measured apart)."""
    from llm.roles import Role
    from trainer.coldstart import cold_start_data
    from trainer.em import EMTrainer

    t = settings.trainer
    q_role, p_role = Role.RATIONALE_MODEL, Role.PROMPT_MODEL
    with probe.step(label, "cold-start data (annotate)") as rec:
        data = cold_start_data(settings, limit=sizes.seeds + sizes.window_seeds)
        window = data.seeds[sizes.seeds :]
        rec.metrics = {"seeds": len(data.seeds) - len(window), "heldout": len(data.heldout)}
    em = EMTrainer(t, {p_role: str(base), q_role: str(base)})
    with probe.step(label, "load q_φ, p_θ"):
        for role in (q_role, p_role):
            probe.watch(em.model(role, t.cold_start).model)

    with probe.step(label, "cold start (q_φ, p_θ)") as rec:
        updates = em.cold_start(data.seeds[: sizes.seeds] + data.heldout)
        rec.trained = trained_dtypes(*(em.model(r, t.cold_start).model for r in em.ROLES))
        rec.loss = ", ".join(f"{SYMBOL[u.role]} {u.metrics['train_loss']:.3f}" for u in updates)
        rec.metrics = {u.role: u.metrics for u in updates}

    def noted(role: str) -> Callable[[StepRecord, Any], None]:
        def note(rec: StepRecord, update: Any) -> None:
            rec.trained = trained_dtypes(em.model(role, t.cold_start).model)
            if update is not None:
                rec.loss = f"{SYMBOL[role]} {update.metrics['train_loss']:.3f}"
                rec.metrics = dict(update.metrics)

        return note

    # run_window calls these two in turn: each is timed as a step of its own.
    em._e_step = probe.wrap(label, "E-step (q_φ)", em._e_step, noted(q_role))  # type: ignore[method-assign]
    em._m_step = probe.wrap(label, "M-step (p_θ)", em._m_step, noted(p_role))  # type: ignore[method-assign]
    result = em.run_window(window_rationales(window, settings.rationale.samples))
    if len(result.updates) != 2:
        raise RuntimeError(f"the EM window trained {len(result.updates)} steps: {result.skipped}")


def dpo_steps(probe: Probe, label: str, base: Path, sizes: Sizes, settings: Any) -> None:
    """One DPO window, then the eval the trainer runs after it (``trainer.eval``)."""
    from llm.roles import Role
    from trainer.checkpoints import CheckpointStore
    from trainer.dpo import DPOTrainerLoop, eval_backend_settings
    from trainer.evaluate import evaluate_path

    t = settings.trainer
    loop = DPOTrainerLoop(t, str(base))
    with probe.step(label, "load solver"):
        probe.watch(loop.solver.model)
    with probe.step(label, "DPO window (solver)") as rec:
        result = loop.run_window(preference_pairs(sizes.pairs))
        if not result.updates:
            raise RuntimeError(f"the DPO window trained nothing: {result.skipped}")
        rec.trained = trained_dtypes(loop.solver.model)
        rec.loss = f"s {result.updates[-1].metrics['train_loss']:.3f}"
        rec.metrics = dict(result.updates[-1].metrics)
    solver = CheckpointStore(t.checkpoint_dir).latest(Role.SOLVER)
    assert solver is not None
    with probe.step(label, f"eval ({sizes.eval_items} GSM8K)") as rec, probe.discovering():
        scored = evaluate_path(
            str(solver.path), t.eval, role=Role.SOLVER, backend=eval_backend_settings(t)
        )
        rec.loss = f"acc {scored.correct}/{scored.n}"
        rec.metrics = {"accuracy": scored.accuracy, "seconds": scored.seconds}


# ---------------------------------------------------------------------------------------------
# The table


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _cell_weights(rec: StepRecord) -> str:
    return ",".join(dict.fromkeys(SHORT.get(w, w) for _, w, _, _ in rec.matmuls)) or "-"


def _cell_compute(rec: StepRecord) -> str:
    """Per mode (train, eval) the dtypes layer 0 computed in, '*' where under autocast."""
    modes: dict[str, list[str]] = {}
    for mode, _, out, autocast in rec.matmuls:
        cell = SHORT.get(out, out) + ("*" if autocast != "off" else "")
        if cell not in modes.setdefault(mode, []):
            modes[mode].append(cell)
    return "; ".join(f"{mode} {','.join(cells)}" for mode, cells in modes.items()) or "-"


def _cell_devices(rec: StepRecord) -> str:
    if rec.misplaced:
        return "MISPLACED: " + "; ".join(rec.misplaced[:3])
    return ", ".join(f"{d} x{n}" for d, n in sorted(rec.devices.items())) or "-"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(records: list[StepRecord]) -> str:
    head = ("model", "step", "wall s", "peak GiB", "held GiB", "trained", "weights")
    head += ("computes in", "tensors on", "loss")
    rows = [head]
    for r in records:
        rows.append(
            (
                r.model,
                r.step,
                f"{r.wall_s:.1f}",
                _gib(r.peak_gib),
                _gib(r.held_gib),
                ",".join(SHORT.get(d, d) for d in r.trained) or "-",
                _cell_weights(r),
                _cell_compute(r),
                _cell_devices(r),
                f"FAILED: {r.error}" if r.error else (r.loss or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    legend = "computes in: the output dtype of layer 0's first projection; * under autocast"
    return "\n".join([*(line.rstrip() for line in lines), legend])


# ---------------------------------------------------------------------------------------------
# The run


def device_line(cpu: bool) -> str:
    import torch

    line = f"torch {torch.__version__}"
    if cpu:
        return f"cpu ({os.cpu_count()} cores), {line}"
    name = torch.cuda.get_device_name(0)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"{name} ({total:.0f} GiB), {line}, CUDA {torch.version.cuda}"


def imported_distributions() -> list[str]:
    """The third-party distributions this process imported (the project itself excluded)."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    by_module = md.packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    names = {canonicalize_name(d) for top in tops for d in by_module.get(top, [])}
    return sorted(names - {"promptcot-factory"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--cpu", action="store_true", help="a quick smoke on CPU: tiny sizes")
    ap.add_argument(
        "--model-dir",
        type=Path,
        help="a folder with the config and tokenizer to initialise at random (default: the "
        "carried SmolLM2-135M's; with --cpu, the tests' tiny model)",
    )
    ap.add_argument("--large", action="store_true", help="then the same at SmolLM2-1.7B's shape")
    ap.add_argument("--wheels", type=Path, help="install what is missing from these wheels")
    ap.add_argument(
        "--site", type=Path, help="where to install them (default: a temporary site-packages)"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="--large starts only if the first pass left more than half of this",
    )
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    versions = gpu_env.ensure(args.wheels, args.site)  # before anything third-party is imported
    listed = ", ".join(f"{k} {v}" for k, v in versions.items())
    print(textwrap.fill(f"packages: {listed}", 100, subsequent_indent="  "), flush=True)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA device (--cpu runs the smoke on CPU)")
    source = args.model_dir or (tiny_model_source() if args.cpu else SMOLLM2_DIR)
    if not (source / "config.json").is_file():
        raise SystemExit(f"gpu-check: no config.json in {source} (ops/gpu-check.sh prepare)")
    device = "cpu" if args.cpu else "cuda"
    sizes = SIZES[device if args.cpu else "gpu"]
    info = {"device": device_line(args.cpu), "sizes": asdict(sizes), "packages": versions}
    print(f"device: {info['device']}", flush=True)
    probe = Probe(device)
    base = CPU_OVERRIDES if args.cpu else {}
    passes = [("base", base)] + ([("large", LARGE)] if args.large else [])
    failed = False
    with tempfile.TemporaryDirectory(prefix="promptcot-gpu-check-") as tmp:
        for shape, overrides in passes:
            elapsed = time.perf_counter() - started
            if shape == "large" and elapsed > args.budget_s / 2:
                print(f"large pass skipped: {elapsed:.0f} s of the {args.budget_s:.0f} s budget")
                info["large_skipped_after_s"] = elapsed
                continue
            work = Path(tmp) / shape
            label = shape
            try:
                with probe.step(shape, "setup: random init, save") as rec:
                    params = random_model(source, work / "base", device, overrides)
                    rec.model = label = f"{shape} {count(params)}"
                run_pass(probe, label, work / "base", sizes, work, args.cpu)
            except Exception:  # noqa: BLE001  (the table says which step; the trace is here)
                traceback.print_exc()
                failed = True
            shutil.rmtree(work, ignore_errors=True)  # 1.7B checkpoints: 6.8 GB each
            free_memory()
            # Each pass's table and records as soon as it is done: a pass that dies keeps them.
            print(table([r for r in probe.records if r.model in (shape, label)]), flush=True)
            info["wall_s"] = time.perf_counter() - started
            write_json(args.out, info, probe.records)
    records = probe.records
    misplaced = [r for r in records if r.misplaced]
    info["wall_s"] = time.perf_counter() - started
    info["imported"] = imported_distributions()
    write_json(args.out, info, records)
    if len({r.model for r in records}) > 1:
        print(f"\n{table(records)}")
    print(f"\nwall: {info['wall_s']:.0f} s in one process", flush=True)
    if misplaced:
        print(f"gpu-check: tensors off the {device}: " + "; ".join(misplaced[0].misplaced[:3]))
    return 1 if failed or misplaced else 0


def write_json(path: Path | None, info: dict[str, Any], records: list[StepRecord]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {**info, "records": [asdict(r) for r in records]}
        path.write_text(json.dumps(report, indent=2, default=str))


def tiny_model_source() -> Path:
    """The tests' tiny model (built and cached on first use): its config and tokenizer."""
    sys.path.insert(0, str(gpu_env.ROOT / "tests"))
    from tiny_model import tiny_model_dir

    return tiny_model_dir()


if __name__ == "__main__":
    sys.exit(main())
