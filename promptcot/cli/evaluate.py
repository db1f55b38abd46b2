"""`promptcot eval`: a model as a solver on a fixed item set, or two compared on the same items
(trainer/evaluate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from promptcot.cli.app import ConfigOpt, app, console, load

if TYPE_CHECKING:
    from llm.backends.base import BackendSettings


@app.command("eval")
def evaluate(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A model folder (full, or a LoRA adapter on its base). Scored in process: "
            "with the --role's settings when that role is served in process (transformers, "
            "vllm: its device and dtype), else (openai) with transformers on the cpu."
        ),
    ] = None,
    role: Annotated[
        str, typer.Option(help="Without MODEL: the role whose checkpoint (or model) to score.")
    ] = "solver",
    version: Annotated[
        str,
        typer.Option(help="Without MODEL: checkpoint version number, 'latest', or 'base'."),
    ] = "latest",
    benchmark: Annotated[
        str, typer.Option(help="gsm8k (test split), aime24, aime25 or hmmt25.")
    ] = "gsm8k",
    limit: Annotated[
        int | None,
        typer.Option(help="Score the first N items of the set (the same N every time)."),
    ] = None,
    all_items: Annotated[
        bool,
        typer.Option(
            "--all",
            help="GSM8K: the whole test split (1319) instead of its fixed 300-problem subset "
            "(corpora/gsm8k/test-subset-300.json). The other benchmarks are always whole.",
        ),
    ] = False,
    gold_nll_only: Annotated[
        bool,
        typer.Option(
            "--gold-nll-only",
            help="Skip generation: only the NLL per token of GSM8K's gold solutions (one "
            "forward pass per item; seconds, where solving takes minutes).",
        ),
    ] = False,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option(
            metavar="A B",
            help="Compare two models on the same items: each a model folder (scored now, with "
            "these options) or the --out JSON of an earlier run. Paired difference A - B with "
            "its 95% interval: McNemar's exact test for accuracy, the paired bootstrap for the "
            "gold NLL per token.",
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Token budget of each solution.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Problems per generate call.", min=1)] = 8,
    out: Annotated[
        Path | None, typer.Option(help="Write the result (per-item results included) as JSON.")
    ] = None,
    prom: Annotated[
        Path | None,
        typer.Option(
            help="Write promptcot_eval_accuracy and promptcot_eval_gold_nll as a Prometheus "
            "text file."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """A model as a solver on a fixed item set: greedy solutions with the solver's own template,
    answers checked by the verifier's equivalence oracle (accuracy with its 95% Wilson interval,
    truncation and answer-extracted rates), and the NLL per token of GSM8K's gold solutions.
    Sets promptcot_eval_accuracy / promptcot_eval_gold_nll{benchmark,role,version}. With
    --compare A B: the paired comparison of two models or two earlier results. LiveCodeBench
    ships no tests, so it cannot be scored."""
    from trainer.evaluate import (
        BENCHMARKS,
        GOLD_BENCHMARKS,
        NOT_SCORABLE,
        comparison_lines,
        result_lines,
        write_json,
    )
    from trainer.evaluate import compare as compare_results
    from trainer.settings import EvalConfig

    settings = load(config)
    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be at least 1")
    if benchmark in NOT_SCORABLE:
        raise typer.BadParameter(f"--benchmark: {NOT_SCORABLE[benchmark]}")
    if benchmark not in BENCHMARKS:
        known = ", ".join(BENCHMARKS)
        raise typer.BadParameter(f"--benchmark: unknown benchmark {benchmark!r} (known: {known})")
    if gold_nll_only and benchmark not in GOLD_BENCHMARKS:
        raise typer.BadParameter(
            f"--gold-nll-only: {benchmark} ships no worked solutions (gold NLL: gsm8k only)"
        )
    if compare and model:
        raise typer.BadParameter(f"give MODEL or --compare A B, not both (MODEL: {model})")
    if compare and prom:
        raise typer.BadParameter("--prom writes the gauges of one run: not with --compare")
    cfg = EvalConfig(
        benchmark=benchmark,
        items="all" if all_items else "subset",
        limit=limit,
        solve=not gold_nll_only,
        max_tokens=max_tokens,
        batch_size=batch_size,
    )
    backend = local_backend(settings.models.role(role)) if role else None
    if compare:
        a, b = (run_or_read(x, cfg, backend, name) for x, name in zip(compare, "AB"))
        comparison = compare_results(a, b)
        for line in comparison_lines(comparison):
            console.print(line, highlight=False, soft_wrap=True)
        if out:
            write_json(comparison, out)
            console.print(f"wrote {out}")
        return
    path = model or resolve_model(settings, role, version)
    result = run_model(path, cfg, backend, role=role if not model else "")
    for line in result_lines(result):
        console.print(line, highlight=False, soft_wrap=True)
    if out:
        write_json(result, out)
        console.print(f"wrote {out}")
    if prom:
        write_prometheus(prom)
        console.print(f"wrote {prom}")


def run_model(path: str, cfg, backend: BackendSettings | None, role: str = ""):
    """``evaluate_path`` on a model folder, with a status line while it runs."""
    from trainer.evaluate import evaluate_path

    if not Path(path).is_dir():
        raise typer.BadParameter(f"not a model folder: {path}")
    what = "gold NLL of" if not cfg.solve else "solving"
    with console.status(f"{what} {cfg.benchmark} with {path}..."):
        return evaluate_path(path, cfg, role=role, backend=backend)


def run_or_read(arg: str, cfg, backend: BackendSettings | None, name: str):
    """One side of --compare: an eval JSON read back, or a model folder scored now."""
    from trainer.evaluate import read_json

    target = Path(arg)
    if target.is_file():
        return read_json(target)
    if target.is_dir():
        return run_model(arg, cfg, backend)
    raise typer.BadParameter(f"--compare {name}: not a model folder or an eval JSON: {arg}")


def local_backend(role: BackendSettings) -> BackendSettings:
    """The settings that load a model folder in process: the role's own when it is served in
    process; an openai role's (a served model name on a server) do not apply to a folder, so it
    is loaded with transformers' defaults."""
    from llm.backends.base import BackendSettings

    return role if role.kind != "openai" else BackendSettings()


def resolve_model(settings, role: str, version: str) -> str:
    """A role's checkpoint by version ('latest' falls back to the role's model when it has no
    checkpoint yet; 'base' is the role's configured model)."""
    from llm.roles import model_path_for
    from trainer.checkpoints import CheckpointStore

    if version == "base":
        return model_path_for(settings.models, role)
    store = CheckpointStore(settings.trainer.checkpoint_dir)
    ckpts = store.list(role)
    if version == "latest":
        return str(ckpts[-1].path) if ckpts else model_path_for(settings.models, role)
    if not version.isdigit():
        raise typer.BadParameter(f"--version: a number, 'latest' or 'base', not {version!r}")
    for ckpt in ckpts:
        if ckpt.version == int(version):
            return str(ckpt.path)
    kept = ", ".join(str(c.version) for c in ckpts) or "none"
    raise typer.BadParameter(f"{role} has no checkpoint v{int(version):04d} (kept: {kept})")


def write_prometheus(path: Path) -> None:
    """The eval gauges alone, in the text format (node exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    from streams import metrics

    registry = CollectorRegistry()
    for source in (metrics.EVAL_ACCURACY, metrics.EVAL_GOLD_NLL):
        gauge = Gauge(
            source._name, source._documentation, ["benchmark", "role", "version"], registry=registry
        )
        for labels, value in metrics.gauge_samples(source):
            gauge.labels(**labels).set(value)
    write_to_textfile(str(path), registry)
