"""`promptcot eval`: a model as a solver on a shipped benchmark (trainer/evaluate.py)."""

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
        int | None, typer.Option(help="Score the first N problems (the same subset every time).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Token budget of each solution.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Problems per generate call.", min=1)] = 8,
    out: Annotated[Path | None, typer.Option(help="Write the result (with items) as JSON.")] = None,
    prom: Annotated[
        Path | None,
        typer.Option(help="Write promptcot_eval_accuracy as a Prometheus text file."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Greedy solutions with the solver's own template, answers checked by the verifier's
    equivalence oracle; prints the accuracy and sets promptcot_eval_accuracy{benchmark,role,
    version}. LiveCodeBench ships no tests, so it cannot be scored."""
    from trainer.evaluate import BENCHMARKS, NOT_SCORABLE, evaluate_path, write_json
    from trainer.settings import EvalConfig

    settings = load(config)
    if limit is not None and limit < 1:
        raise typer.BadParameter("--limit must be at least 1")
    if benchmark in NOT_SCORABLE:
        raise typer.BadParameter(f"--benchmark: {NOT_SCORABLE[benchmark]}")
    if benchmark not in BENCHMARKS:
        known = ", ".join(BENCHMARKS)
        raise typer.BadParameter(f"--benchmark: unknown benchmark {benchmark!r} (known: {known})")
    path = model or resolve_model(settings, role, version)
    if not Path(path).is_dir():
        raise typer.BadParameter(f"not a model folder: {path}")
    cfg = EvalConfig(
        benchmark=benchmark, limit=limit or 10**9, max_tokens=max_tokens, batch_size=batch_size
    )
    backend = local_backend(settings.models.role(role)) if role else None
    with console.status(f"solving {benchmark} with {path}..."):
        result = evaluate_path(path, cfg, role=role if not model else "", backend=backend)
    console.print(
        f"{benchmark}: {result.correct}/{result.n} = {100 * result.accuracy:.1f}% "
        f"({result.version}, {result.seconds:,.0f}s)"
    )
    if out:
        write_json(result, out)
        console.print(f"wrote {out}")
    if prom:
        write_prometheus(prom)
        console.print(f"wrote {prom}")


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
    """The eval gauge alone, in the text format (node exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    from streams import metrics

    registry = CollectorRegistry()
    gauge = Gauge(
        "promptcot_eval_accuracy",
        metrics.EVAL_ACCURACY._documentation,
        ["benchmark", "role", "version"],
        registry=registry,
    )
    for labels, value in metrics.gauge_samples(metrics.EVAL_ACCURACY):
        gauge.labels(**labels).set(value)
    write_to_textfile(str(path), registry)
