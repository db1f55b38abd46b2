"""Where the factory's memory goes: ``python -m bench --case memory``.

Two measurements, both on the embedded default (SmolLM2-135M in every role, the cpu profile):

1. **The account** (a child process per run): the stages `promptcot up` runs, set up one after
   the other, then the trainer's models, new versions served, a DPO window and an eval of the
   new solver. Per step: the resident memory it added (RSS after minus before, with a garbage
   collection and ``malloc_trim`` on both sides, so what the allocator merely kept does not
   count) and the peak above the start during it. At the end: tensor bytes per component,
   storages deduplicated by data pointer (streams/memory.py: a storage counts once, under the
   first component that holds it, shared base copies first), and the tensor bytes no component
   accounts for. RSS deltas see everything (tokenizers, LanceDB, arrow, Python objects); tensor
   bytes say which model holds what, and what is shared.
2. **The curve** (per run): `promptcot up --max-problems N --duration D` in a fresh folder (the
   cold start included, as in the README run). Its process tree is sampled from /proc every 2 s
   (bench/rss.py: the factory, the embedded broker and its S3 server, sandboxes), its /metrics
   scraped every 10 s (promptcot_process_malloc_bytes, promptcot_model_weight_bytes, pending
   records per stage, model versions), its log lines timestamped. Reported: the peak, when it
   happened and the log lines before it, the second half's peak over the first half's, and the
   slope of the second half.

    python -m bench --case memory                          # account + 3 runs of 10 minutes
    python -m bench --case memory --duration 25m --runs 1  # the README run
    python -m bench.memory --duration 2h --runs 1 --out bench-out/memory-2h
    python -m bench.memory --account-only --runs 1
    python -m bench.memory --env MALLOC_ARENA_MAX=2 --duration 10m   # an allocator arm

Writes ``memory.json`` (every sample, scrape and figure) and ``memory.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.rss import PeakRSS, TreeSampler, measure_process  # noqa: E402
from streams import memory  # noqa: E402

CASE = "memory"
MB = 1e6
# Log lines that say what the factory is doing (marked on the plot, quoted at the peak).
EVENTS = re.compile(
    r"cold start|E-step|M-step|DPO window|reload: |now serves|eval|window|trainer", re.IGNORECASE
)


# The Kafka clients' INFO lines (connections, metadata): left out of the lines quoted at the peak.
_CLIENT_CHATTER = re.compile(r" (INFO|DEBUG) (aio)?kafka[.:]")


def row(
    name: str,
    value: Any,
    unit: str,
    goal: str | None = None,
    ok: bool | None = None,
    runs: list[float] | None = None,
) -> dict[str, Any]:
    out = {"case": CASE, "name": name, "value": value, "unit": unit, "goal": goal, "ok": ok}
    if runs:
        out.update(spread=[min(runs), max(runs)], runs=len(runs))
    return out


# ---------------------------------------------------------------------------------------------
# 1. The account (runs in a child process: it loads every model)


def _settle() -> dict[str, int]:
    """This process's memory after a garbage collection and a trim (bench/rss.py's kinds)."""
    gc.collect()
    memory.trim()
    return measure_process(os.getpid()) or {}


def _pairs(heldout_fraction: float, n: int = 4) -> list[Any]:
    """Short preference pairs of problems the trainer does not hold out."""
    from streams.records import PreferencePair
    from trainer.heldout import is_heldout

    out, i = [], 0
    while len(out) < n:
        pid = f"memory-bench-{i}"
        i += 1
        if is_heldout(pid, heldout_fraction):
            continue
        a, b = i + 2, i + 5
        out.append(
            PreferencePair(
                problem_id=pid,
                domain="math",
                prompt=f"Ana has {a} apples and gets {b} more. How many apples does she have?",
                chosen=f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                rejected=f"{a} - {b} = {a - b}. The answer is \\boxed{{{a - b}}}.",
            )
        )
    return out


def account(work: Path) -> dict[str, Any]:
    """The account, in this process (module docstring, 1)."""
    steps: list[dict[str, Any]] = []
    start = _settle()

    def step(label: str, fn: Any) -> Any:
        before = _settle()
        started = time.monotonic()
        with PeakRSS(every_s=0.1) as peak:
            try:
                value = fn()
                failed = None
            except Exception as e:  # noqa: BLE001  (a failing step is reported, the rest goes on)
                value, failed = None, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        top = peak.peak
        after = _settle()
        added = {k: after.get(k, 0) - before.get(k, 0) for k in ("rss", "anon", "file", "pss")}
        steps.append(
            {
                "step": label,
                "added_bytes": added,
                "peak_above_start_bytes": top - before.get("rss", 0),
                "after_bytes": after,
                "seconds": round(time.monotonic() - started, 1),
                **({"failed": failed} if failed else {}),
            }
        )
        print(
            f"[memory] {label}: RSS {added['rss'] / MB:+.0f} MB (anon {added['anon'] / MB:+.0f}, "
            f"file {added['file'] / MB:+.0f}, PSS {added['pss'] / MB:+.0f}; peak "
            f"+{(top - before.get('rss', 0)) / MB:.0f}){' FAILED ' + failed if failed else ''}",
            file=sys.stderr,
            flush=True,
        )
        return value

    import importlib

    modules = (
        "torch",
        "transformers",
        "peft",
        "trl",
        "datasets",
        "lancedb",
        "sentence_transformers",
    )
    step(
        "imports (torch, transformers, peft, trl, datasets, lancedb)",
        lambda: [importlib.import_module(m) for m in modules],
    )

    from llm.roles import Role, model_path_for, reload_role
    from promptcot.settings import load_settings
    from promptcot.startup import make_stage, stage_names
    from streams.broker import EmbeddedBroker
    from trainer.dpo import eval_backend_settings
    from trainer.evaluate import evaluate_path
    from trainer.role_models import save_role_model
    from trainer.settings import EvalConfig

    with EmbeddedBroker() as broker:
        settings = load_settings(
            kafka={"bootstrap_servers": broker.bootstrap_servers, "namespace": "memacct"},
            trainer={"checkpoint_dir": str(work / "checkpoints")},
            sink={"output_dir": str(work / "output")},
            vectorstore={"store": {"uri": str(work / "lancedb")}},
            worker={"journal_dir": str(work / "journal")},
            metrics={"port": 0},
        )
        step(
            "the embedded SmolLM2 folder prepared",
            lambda: model_path_for(settings.models, "solver"),
        )
        stages = {}
        for name in stage_names(None, True):
            stages[name] = stage = make_stage(name, settings)
            step(f"stage {name} set up", stage.ensure_ready)
        # Loading maps a model's weights from its file; they become resident when first read.
        step("every served role answers once (its weights read)", lambda: _touch_served(settings))
        cfg = settings.trainer
        em = getattr(stages.get("em"), "trainer", None)
        dpo = getattr(stages.get("dpo"), "trainer", None)
        again = None
        if em is not None:
            p = step(
                "trainer p_θ loaded, scores once",
                lambda: _touched(em.model(Role.PROMPT_MODEL, cfg.m_step)),
            )
            q = step(
                "trainer q_φ loaded, scores once",
                lambda: _touched(em.model(Role.RATIONALE_MODEL, cfg.e_step)),
            )
            saved = step(
                "their first versions saved (adapters as loaded, untrained)",
                lambda: [save_role_model(em.store, rm, "cold_start") for rm in (p, q)],
            )
            for rm, ckpt in zip((p, q), saved or []):
                step(
                    f"served {rm.role} moved to {ckpt.version_string}",
                    lambda rm=rm, ckpt=ckpt: reload_role(settings.models, rm.role, str(ckpt.path)),
                )
            again = step(
                "a second p_θ version saved", lambda: save_role_model(em.store, p, "m_step")
            )
            if again is not None:
                step(
                    f"served p_θ moved to {again.version_string}",
                    lambda: reload_role(settings.models, Role.PROMPT_MODEL, str(again.path)),
                )
        if dpo is not None:
            step("trainer solver loaded, scores once", lambda: _touched(dpo.solver))
            result = step(
                "a DPO window (4 short pairs)", lambda: dpo.run_window(_pairs(cfg.heldout_fraction))
            )
            new = [u for u in getattr(result, "updates", []) if u.role == Role.SOLVER]
            if new:
                path = new[-1].path
                step(
                    f"served solver moved to {new[-1].version}",
                    lambda: reload_role(settings.models, Role.SOLVER, path),
                )
                eval_cfg = EvalConfig(limit=2, max_tokens=32, batch_size=2)
                step(
                    "an eval of that version (2 GSM8K problems, then closed)",
                    lambda: evaluate_path(
                        path, eval_cfg, role=Role.SOLVER, backend=eval_backend_settings(cfg)
                    ),
                )
        speed = None
        if again is not None:
            speed = _adapter_speed(str(again.path))
        components = _components(settings, stages)
        rows = memory.account(components)
        attributed = sum(r.own for r in rows)
        everything = _all_tensor_bytes()
        end = _settle()
        for stage in stages.values():
            stage.close()
    return {
        "start_bytes": start,
        "end_bytes": end,
        "steps": steps,
        "tensors": [{"component": r.component, "own": r.own, "shared": r.shared} for r in rows],
        "tensor_bytes_attributed": attributed,
        "tensor_bytes_all": everything,
        "adapter_speed": speed,
    }


_TEXT = "Ana has 3 apples and gets 4 more. How many apples does she have now?"


def _touch_served(settings: Any) -> None:
    from llm.roles import RoleBackends

    pool = RoleBackends.pool(settings.models)
    for backend in {id(b): b for b in dict(pool._by_role).values()}.values():
        backend.generate([_TEXT], temperature=0.0, max_tokens=4)


def _touched(rm: Any) -> Any:
    """A trainer's role model after one scoring pass (its weights read)."""
    from trainer.engine import continuation_nll

    continuation_nll(rm.model, rm.tokenizer, [_TEXT], [" 7"])
    return rm


def _adapter_speed(adapter: str, runs: int = 3) -> dict[str, list[float]] | None:
    """What serving an adapter unmerged on the shared base costs in speed: tokens/s of greedy
    generation (8 synthesis prompts, 32 tokens) by a backend serving ``adapter`` as it does,
    and by one whose model is the adapter merged into a private copy of the base (how a
    backend served an adapter before the shared base), alternated ``runs`` times. None on a
    checkout without shared bases."""
    try:
        from llm.shared_base import private_model
    except ImportError:
        return None
    from peft import PeftModel

    from llm import prompts as P
    from llm.backends.base import BackendSettings, adapter_base
    from llm.backends.transformers_backend import TransformersBackend

    settings = BackendSettings(model=adapter, max_batch_size=8)
    unmerged, merged = TransformersBackend(settings), TransformersBackend(settings)
    base = adapter_base(adapter) or adapter
    merged.model = PeftModel.from_pretrained(private_model(base), adapter).merge_and_unload()
    merged.model.eval()
    fields = P.synthesis_fields(["whole numbers", "counting objects"], "AMC12", "math")
    prompts = [P.SYNTHESIS.render(unmerged, **fields)] * 8
    out: dict[str, list[float]] = {"unmerged": [], "merged": []}
    for _ in range(runs):
        for name, backend in (("unmerged", unmerged), ("merged", merged)):
            started = time.perf_counter()
            done = backend.generate(prompts, temperature=0.0, max_tokens=32)
            tokens = sum(c.n_completion_tokens for item in done for c in item)
            out[name].append(tokens / (time.perf_counter() - started))
    merged.close()
    unmerged.close()
    return out


def _components(settings: Any, stages: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, model) of everything the account loaded, shared bases first. Read off the objects
    themselves, so that the account runs on a checkout without a memory registry as well."""
    from llm.roles import RoleBackends

    out: list[tuple[str, Any]] = []
    try:
        from llm.shared_base import live_bases

        for base in live_bases():
            out += base.memory_components()
    except ImportError:  # a checkout before shared bases
        pass
    pool = RoleBackends.pool(settings.models)
    served: dict[int, tuple[list[str], Any]] = {}
    for role, backend in dict(pool._by_role).items():
        served.setdefault(id(backend), ([], backend))[0].append(role)
    for roles, backend in served.values():
        if getattr(backend, "model", None) is not None:
            out.append(("serving " + "+".join(sorted(roles)), backend.model))
    em = getattr(stages.get("em"), "trainer", None)
    for role, rm in dict(getattr(em, "_models", {})).items():
        out.append((f"trainer {role}", rm.model))
    rm = getattr(getattr(stages.get("dpo"), "trainer", None), "_rm", None)
    if rm is not None:
        out.append(("trainer solver", rm.model))
    dedup = getattr(stages.get("filter"), "dedup", None)
    embedder = getattr(dedup, "embedder", None)
    if embedder is not None:
        out.append((f"embedder {embedder.model_name}", embedder._model))
    return out


def _all_tensor_bytes() -> int:
    """Bytes of every torch tensor storage alive in this process (through the garbage
    collector), each storage once."""
    import torch

    storages: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
        except Exception:  # noqa: BLE001, S112  (a tensor subclass that refuses: not ours)
            continue
    return sum(storages.values())


def run_account(out: Path) -> dict[str, Any]:
    """The account in a child process (``--account-child``); its JSON."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / "account.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(
        [sys.executable, "-m", "bench.memory", "--account-child", str(result)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return json.loads(result.read_text())


# ---------------------------------------------------------------------------------------------
# 2. The curve of a `promptcot up` run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FAMILIES = {
    "promptcot_process_resident_bytes": (),
    "promptcot_process_malloc_bytes": ("kind",),
    "promptcot_model_weight_bytes": ("component", "sharing"),
    "promptcot_stage_pending_records": ("stage",),
    "promptcot_model_version": ("role",),
}


def scrape(port: int) -> dict[str, Any] | None:
    """The memory figures and what the stages hold, from the factory's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in _FAMILIES:
                continue
            labels = [sample.labels.get(k, "") for k in _FAMILIES[sample.name]]
            key = sample.name.removeprefix("promptcot_")
            if not labels:
                out[key] = sample.value
            else:
                out.setdefault(key, {})["/".join(labels)] = sample.value
    return out


def live(
    work: Path,
    duration_s: float,
    max_problems: int,
    env_extra: dict[str, str],
    checkpoints: Path | None = None,
) -> dict[str, Any]:
    """One `promptcot up` run in ``work`` (fresh), measured (module docstring, 2).
    ``checkpoints``: a trainer checkpoint folder copied in first, so that the run skips the
    cold start and measures the loop from its first minute."""
    work.mkdir(parents=True, exist_ok=True)
    if checkpoints is not None:
        import shutil

        shutil.copytree(checkpoints, work / "promptcot-output" / "checkpoints")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PROMPTCOT_METRICS__PORT": str(port),
        "PROMPTCOT_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",  # the console lines arrive when printed, to be timed
        **env_extra,
    }
    command = [
        sys.executable,
        "-m",
        "promptcot",
        "up",
        "--max-problems",
        str(max_problems),
        "--duration",
        f"{int(duration_s)}s",
    ]
    lines: list[tuple[float, str]] = []
    scrapes: list[dict[str, Any]] = []
    with open(work / "up.log", "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        sampler = TreeSampler(proc.pid).start()
        done = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                t = time.monotonic() - sampler.started
                lines.append((round(t, 1), line.rstrip()))
                log.write(f"[{t:8.1f}s] {line}")

        def poll_metrics() -> None:
            while not done.wait(10.0):
                found = scrape(port)
                if found is not None:
                    scrapes.append({"t": round(time.monotonic() - sampler.started, 1), **found})

        threads = [threading.Thread(target=f, daemon=True) for f in (read, poll_metrics)]
        for t in threads:
            t.start()
        try:
            code = proc.wait(timeout=duration_s + 900)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        done.set()
        sampler.stop()
        for t in threads:
            t.join(timeout=15)
    return {
        "command": " ".join(command),
        "env": env_extra,
        "exit_code": code,
        "samples": sampler.to_json(),
        "scrapes": scrapes,
        "lines": lines,
        "summary": summarise(sampler, scrapes, lines),
    }


def summarise(sampler: TreeSampler, scrapes: list[dict[str, Any]], lines: list) -> dict[str, Any]:
    samples = sampler.samples
    if not samples:
        return {}
    peak = sampler.peak
    assert peak is not None
    end = samples[-1].t
    first = [s for s in samples if s.t <= end / 2]
    second = [s for s in samples if s.t > end / 2]
    root = sampler.root_name
    top = max(samples, key=lambda s: s.procs.get(root, {}).get("rss", 0))
    near = min(scrapes, key=lambda s: abs(s["t"] - peak.t), default=None)
    return {
        "seconds": round(end, 1),
        "peak_total_bytes": peak.total,
        "peak_t": round(peak.t, 1),
        "peak_by_process": peak.procs,
        "peak_factory_bytes": top.procs.get(root, {}).get("rss", 0),
        "peak_pss_total_bytes": max(s.total_pss for s in samples),
        "first_half_peak_bytes": max((s.total for s in first), default=0),
        "second_half_peak_bytes": max((s.total for s in second), default=0),
        "second_half_slope_mb_per_min": _slope([(s.t, s.total) for s in second]),
        "end_total_bytes": samples[-1].total,
        "log_before_peak": [
            f"[{t:.0f}s] {text}"
            for t, text in lines
            if peak.t - 120 <= t <= peak.t + 5 and not _CLIENT_CHATTER.search(text)
        ][-30:],
        "metrics_at_peak": near,
    }


def _slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope in MB per minute."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] / 60 for p in points], [p[1] / MB for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def _rss(sample: dict[str, Any]) -> int:
    return sum(p.get("rss", 0) for p in sample["procs"].values())


def _pss(sample: dict[str, Any]) -> int:
    return sum(p.get("pss", 0) for p in sample["procs"].values())


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    first = runs[0]
    root = "promptcot up"

    # Run 1 by process, the factory's anonymous and file-backed pages apart.
    def parts(name: str, kinds: dict[str, int]) -> dict[str, float]:
        if name == root:
            return {f"{name}: anon": kinds.get("anon", 0), f"{name}: file": kinds.get("file", 0)}
        return {name: kinds.get("rss", 0)}

    n = len(first["samples"])
    series: dict[str, list[float]] = {}
    for i, s in enumerate(first["samples"]):
        for name, kinds in s["procs"].items():
            for label, value in parts(name, kinds).items():
                series.setdefault(label, [0.0] * n)[i] = value / 1e9
    names = sorted(series, key=lambda n: -max(series[n]))
    ts = [s["t"] / 60 for s in first["samples"]]
    top.stackplot(ts, *[series[n] for n in names], labels=names, alpha=0.75)
    top.plot(
        ts,
        [_pss(s) / 1e9 for s in first["samples"]],
        color="k",
        lw=0.8,
        label="run 1: PSS, all processes",
    )
    for i, run in enumerate(runs[1:], start=2):
        top.plot(
            [s["t"] / 60 for s in run["samples"]],
            [_rss(s) / 1e9 for s in run["samples"]],
            lw=1,
            label=f"run {i}: RSS, all processes",
        )
    summary = first["summary"]
    if summary:
        top.axvline(summary["peak_t"] / 60, color="k", ls=":", lw=1)
        top.annotate(
            f"peak {summary['peak_total_bytes'] / 1e9:.2f} GB",
            (summary["peak_t"] / 60, summary["peak_total_bytes"] / 1e9),
            fontsize=8,
        )
    for t, text in first["lines"]:
        if EVENTS.search(text):
            top.axvline(t / 60, color="grey", alpha=0.15, lw=0.8)
    top.set_ylabel("resident GB (run 1 by process)")
    top.legend(fontsize=7, loc="upper left")
    top.grid(alpha=0.3)
    for i, run in enumerate(runs, start=1):
        sc = run["scrapes"]
        if not sc:
            continue
        t = [s["t"] / 60 for s in sc]
        style = {"lw": 1.2 if i == 1 else 0.6}
        malloc = [s.get("process_malloc_bytes", {}) for s in sc]
        weights = [
            sum(v for k, v in s.get("model_weight_bytes", {}).items() if k.endswith("/own"))
            for s in sc
        ]
        bottom.plot(
            t, [m.get("in_use", 0) / 1e9 for m in malloc], label=f"run {i}: malloc in use", **style
        )
        bottom.plot(
            t,
            [m.get("free", 0) / 1e9 for m in malloc],
            ls="--",
            label=f"run {i}: malloc free, held",
            **style,
        )
        bottom.plot(t, [w / 1e9 for w in weights], ls=":", label=f"run {i}: tensors (own)", **style)
    bottom.set_xlabel("minutes since start")
    bottom.set_ylabel("GB (the factory process)")
    bottom.legend(fontsize=7, loc="upper left")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Figures


def _median_row(name: str, values: list[float], unit: str, **goal: Any) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return row(f"not run: {name}", None, unit)
    return row(name, statistics.median(values), unit, runs=values, **goal)


def figures(
    accounts: list[dict[str, Any]], runs: list[dict[str, Any]], duration_s: float
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if accounts:
        for i, s in enumerate(accounts[0]["steps"]):
            same = [a["steps"][i] for a in accounts if i < len(a["steps"])]
            failed = f" (failed: {s['failed']})" if "failed" in s else ""
            for kind, what in (("rss", "RSS"), ("anon", "anonymous"), ("pss", "PSS")):
                out.append(
                    _median_row(
                        f"account: {what} added by {s['step']}{failed}",
                        [x["added_bytes"].get(kind, 0) / MB for x in same],
                        "MB",
                    )
                )
            out.append(
                _median_row(
                    f"account: RSS peak during {s['step']}, above its start",
                    [x["peak_above_start_bytes"] / MB for x in same],
                    "MB",
                )
            )
        last = accounts[-1]
        for t in last["tensors"]:
            out.append(
                row(
                    f"account: tensors of {t['component']}, own (shared)",
                    [round(t["own"] / MB, 1), round(t["shared"] / MB, 1)],
                    "MB",
                )
            )
        out.append(
            _median_row(
                "account: tensor bytes, every component (own)",
                [a["tensor_bytes_attributed"] / MB for a in accounts],
                "MB",
            )
        )
        out.append(
            _median_row(
                "account: tensor bytes alive in the process (all tensors)",
                [a["tensor_bytes_all"] / MB for a in accounts],
                "MB",
            )
        )
        speeds = [a["adapter_speed"] for a in accounts if a.get("adapter_speed")]
        if speeds:
            per_run = [u / m for a in speeds for u, m in zip(a["unmerged"], a["merged"])]
            out.append(
                _median_row(
                    "served adapter unmerged on the shared base / merged into a private copy: "
                    "greedy tokens/s (SmolLM2, 8 prompts, 32 tokens)",
                    per_run,
                    "x",
                )
            )
        for kind, what in (
            ("rss", "RSS"),
            ("anon", "anonymous"),
            ("file", "file-backed"),
            ("pss", "PSS"),
        ):
            out.append(
                _median_row(
                    f"account: {what} at the end",
                    [a["end_bytes"].get(kind, 0) / MB for a in accounts],
                    "MB",
                )
            )
    done = [r["summary"] for r in runs if r.get("summary")]
    if done:
        minutes = f"{duration_s / 60:g}-minute up run"
        out.append(
            _median_row(
                f"{minutes}: peak RSS, factory + broker + children",
                [s["peak_total_bytes"] / 1e9 for s in done],
                "GB",
                goal="<= 3 GB",
                ok=statistics.median(s["peak_total_bytes"] for s in done) <= 3e9,
            )
        )
        out.append(
            _median_row(
                f"{minutes}: peak RSS of the factory process",
                [s["peak_factory_bytes"] / 1e9 for s in done],
                "GB",
            )
        )
        out.append(
            _median_row(
                f"{minutes}: peak PSS, all processes (a page mapped twice counts once)",
                [s["peak_pss_total_bytes"] / 1e9 for s in done],
                "GB",
            )
        )
        out.append(
            _median_row(f"{minutes}: minute of the peak", [s["peak_t"] / 60 for s in done], "min")
        )
        ratios = [
            s["second_half_peak_bytes"] / s["first_half_peak_bytes"]
            for s in done
            if s["first_half_peak_bytes"]
        ]
        out.append(
            _median_row(
                f"{minutes}: peak of the second half / peak of the first",
                ratios,
                "x",
                goal="<= 1.1x",
                ok=bool(ratios) and statistics.median(ratios) <= 1.1,
            )
        )
        out.append(
            _median_row(
                f"{minutes}: slope of the second half",
                [s["second_half_slope_mb_per_min"] for s in done],
                "MB/min",
            )
        )
    return out


def measure(
    quick: bool = False,
    duration_s: float = 600.0,
    runs: int = 3,
    out: Path | None = None,
    max_problems: int = 3,
    env: dict[str, str] | None = None,
    account_only: bool = False,
    checkpoints: Path | None = None,
) -> list[dict[str, Any]]:
    """The figures as rows for `python -m bench` (``quick``: one account, no `up` run)."""
    out = out or Path(tempfile.mkdtemp(prefix="promptcot-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    n_accounts = 1 if quick else runs
    accounts = [run_account(out / f"account-{i + 1}") for i in range(n_accounts)]
    lives: list[dict[str, Any]] = []
    if not (quick or account_only):
        for i in range(runs):
            print(
                f"[memory] up run {i + 1}/{runs} ({duration_s / 60:g} min)",
                file=sys.stderr,
                flush=True,
            )
            lives.append(
                live(out / f"run-{i + 1}", duration_s, max_problems, env or {}, checkpoints)
            )
            _write(out, accounts, lives, duration_s)
    rows = figures(accounts, lives, duration_s)
    _write(out, accounts, lives, duration_s, rows)
    if lives:
        plot(lives, out / "memory.png")
    return rows


def _write(
    out: Path, accounts: list, lives: list, duration_s: float, rows: list | None = None
) -> None:
    from bench.harness import load_average, meta

    report = {
        "meta": {**meta(False), "load_average_1m_end": load_average()},
        "duration_s": duration_s,
        "accounts": accounts,
        "runs": lives,
        "figures": rows or [],
    }
    (out / "memory.json").write_text(json.dumps(report, indent=1, default=str))


def main(argv: list[str] | None = None) -> None:
    from promptcot.cli.app import parse_duration

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", default="10m", help="length of each `up` run (e.g. 25m, 2h)")
    ap.add_argument("--runs", type=int, default=3, help="runs (accounts and `up` runs)")
    ap.add_argument("--max-problems", type=int, default=3, help="`up --max-problems`")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="for the `up` runs")
    ap.add_argument("--account-only", action="store_true", help="no `up` run")
    ap.add_argument(
        "--checkpoints",
        type=Path,
        help="a trainer checkpoint folder each `up` run starts from (no cold start)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    ap.add_argument("--account-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.account_child:
        with tempfile.TemporaryDirectory(prefix="promptcot-account-") as work:
            result = account(Path(work))
        args.account_child.write_text(json.dumps(result, indent=1))
        return
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = measure(
        duration_s=parse_duration(args.duration),
        runs=args.runs,
        out=args.out,
        max_problems=args.max_problems,
        env=env,
        account_only=args.account_only,
        checkpoints=args.checkpoints,
    )
    from bench.harness import table

    print(table(rows))
    print(f"report: {args.out / 'memory.json'}")


if __name__ == "__main__":
    main()
