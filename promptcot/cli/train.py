"""Training on demand: `promptcot train cold-start` (the paper's cold start, which the em stage
also runs by itself on first start). docs/training.md."""

from __future__ import annotations

from typing import Annotated

import typer

from promptcot.cli.app import BootstrapOpt, ConfigOpt, app, console, load, require_cluster

train_app = typer.Typer(help="Train the models of the loop on demand.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("cold-start")
def cold_start(
    seeds: Annotated[
        int | None,
        typer.Option(help="Seed problems to annotate and train on (trainer.cold_start.seeds)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Train again even where p_θ / q_φ have checkpoints already."),
    ] = False,
    publish: Annotated[
        bool,
        typer.Option(help="Announce the new versions on the models topic (needs a cluster)."),
    ] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """SFT of p_θ and q_φ on annotated seeds (c, z, x). With a teacher configured
    (models.annotator.model, or annotate.concept_source / rationale_source: model) the teacher
    writes the rationale, and the concepts too with annotate.concept_source: model (else they
    come from the lexicon); without one each seed is annotated without a model (lexicon
    concepts, rationale from its worked solution). Writes checkpoints under
    trainer.checkpoint_dir. Under torchrun / accelerate launch every process trains (data
    parallel) and rank 0 writes and reports (docs/training.md)."""
    from llm.roles import Role
    from trainer import coldstart
    from trainer.em import EMTrainer
    from trainer.role_models import distributed_rank

    settings = load(config, bootstrap)
    console.quiet = distributed_rank() != 0
    if seeds is not None and seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    target = require_cluster(settings) if publish else None
    trainer = EMTrainer.on_models(settings.trainer, settings.models)
    status = console.status("annotating seeds...")

    def annotated(data: coldstart.ColdStartData) -> None:
        rejected = ", ".join(f"{k} {v}" for k, v in data.rejected.most_common()) or "none"
        console.print(
            f"annotated {len(data.seeds)} seeds ({100 * data.success_rate:.1f}%; "
            f"rejected: {rejected}), and {len(data.heldout)} held-out seeds further on for the "
            "held-out pool"
        )
        if not data.seeds:
            raise typer.BadParameter("no seed could be annotated: nothing to train on")
        status.update(f"training {Role.RATIONALE_MODEL} and {Role.PROMPT_MODEL}...")

    with status:
        done = coldstart.cold_start(
            settings, trainer, limit=seeds, force=force, annotated=annotated
        )
    if done is None:
        versions = ", ".join(
            trainer.store.latest(role).version_string
            for role in EMTrainer.ROLES  # type: ignore[union-attr]
        )
        console.print(f"already cold-started ({versions}); --force trains again")
        return
    updates = done.updates
    for u in updates:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(u.metrics.items()))
        console.print(f"[bold]{u.version}[/] {u.path}\n  {shown}", soft_wrap=True, highlight=False)
    if target and distributed_rank() == 0:  # every rank has the updates: one announces them
        from streams.clients import publish as send
        from streams.topics import MODELS

        n = send(settings.kafka, target, MODELS, updates)
        console.print(f"announced {n} versions on {MODELS.full_name(settings.kafka.namespace)}")
