"""The cold start: triples (c, z, x) without a model on the embedded default (lexicon concepts, a
rationale from the seed's worked solution) or from the teacher when one is configured; the em
stage runs it on first start, and `promptcot train cold-start` on demand."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from promptcot.settings import Settings
from streams.records import ModelUpdate
from streams.topics import MODELS, SEEDS_ANNOTATED, VERDICTS
from trainer.checkpoints import CheckpointStore
from trainer.coldstart import cold_start_data
from trainer.heldout import is_heldout
from workers.annotation import ANNOTATOR, solution_rationale, solution_steps
from workers.seeds import iter_seeds, load_seeds
from workers.stages.annotate import AnnotateStage, uses_teacher

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

HELDOUT_SEEDS = 5
FAST = {
    "lr": 5e-3,
    "epochs": 2.0,
    "batch_size": 4,
    "per_device_batch_size": 4,
    "max_seq_len": 512,
    "use_lora": True,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
}


def test_the_rationale_is_derived_from_the_worked_solution():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
    )
    assert solution_steps(solution) == [
        "Natalia sold 48/2 = 24 clips in May.",
        "Natalia sold 48+24 = 72 clips altogether in April and May.",
    ]
    z = solution_rationale(["fractions of a quantity", "addition of quantities"], solution, "72")
    assert "fractions of a quantity; addition of quantities" in z and "2 steps" in z
    assert "1. Natalia sold 48/2 = 24 clips in May." in z and z.endswith("the answer is 72.")
    assert "<<" not in z and "####" not in z
    long = "\n".join(f"Step {i} adds {i} = <<{i}={i}>>{i} more." for i in range(40)) + "\n#### 9"
    short = solution_rationale(["counting"], long, "9", max_chars=300)
    assert len(short) <= 300 and "more steps of the same kind" in short  # fits the budget
    # max_chars is a hard cap, whatever the length of the step that no longer fits.
    for width in (5, 30, 70):
        steps = "\n".join(f"Step {i}: " + "x" * (width + i % 7) for i in range(30))
        for cap in range(170, 500, 7):  # from where head, tail and "Then..." fit
            z = solution_rationale(["counting"], steps + "\n#### 9", "9", max_chars=cap)
            assert len(z) <= cap, (width, cap, len(z))


def test_without_a_teacher_annotate_builds_the_triples_from_the_shipped_seeds():
    settings = Settings()
    assert not uses_teacher(settings)  # the embedded default: no annotator model configured
    stage = AnnotateStage(settings)
    stage.ensure_ready()  # loads no model
    seeds = load_seeds("gsm8k", "train", 300)
    emits = stage.process(seeds)
    annotated = [e.record for e in emits if e.topic is SEEDS_ANNOTATED]
    assert len(annotated) + sum(e.topic is VERDICTS for e in emits) == len(seeds)
    assert len(annotated) / len(seeds) >= 0.9
    for a in annotated[:20]:
        assert a.annotator == ANNOTATOR and 1 <= len(a.concepts) <= 5 and a.epoch == 0
        assert a.rationale.startswith("Concepts to combine: " + a.concepts[0])
    # A seed without a worked solution (a Codeforces statement) gets a reason, not a guess.
    (code,) = stage.process(load_seeds("codeforces", "train", 1))
    assert code.topic is VERDICTS and code.record.reason in ("no_solution", "missing_concepts")


def test_with_a_teacher_configured_the_teacher_annotates(tiny_model_dir, tmp_path):
    settings = Settings(
        models={"annotator": {"model": str(tiny_model_dir)}},
        annotate={"max_tokens": 48},
        trainer={"checkpoint_dir": tmp_path},
    )
    assert uses_teacher(settings)
    data = cold_start_data(settings, limit=3)
    assert len(data.seeds) + sum(data.rejected.values()) == 3
    assert all(s.annotator != ANNOTATOR for s in data.seeds)  # the teacher's model version


def _settings(tmp_path, model, **trainer) -> Settings:
    return Settings(
        models={r: {"model": str(model)} for r in ("prompt_model", "rationale_model", "solver")},
        trainer={
            "checkpoint_dir": tmp_path / "ckpt",
            "heldout_fraction": 0.25,
            "heldout_seeds": HELDOUT_SEEDS,
            "cold_start": {**FAST, "seeds": 8},
            **trainer,
        },
        metrics={"port": 0},
    )


def test_the_em_stage_cold_starts_every_model_on_first_start(tmp_path, tiny_model_dir):
    from trainer.stages import EStepStage

    settings = _settings(tmp_path, tiny_model_dir)
    emits = EStepStage(settings).start()
    updates = [e.record for e in emits]
    assert all(e.topic is MODELS and isinstance(e.record, ModelUpdate) for e in emits)
    assert [(u.role, u.version) for u in updates] == [
        ("rationale_model", "rationale_model/v0001-cold_start"),
        ("prompt_model", "prompt_model/v0001-cold_start"),
        ("solver", "solver/v0001-cold_start"),
    ]
    seeds = load_seeds("gsm8k", "train", 8)
    held = [s for s in seeds if is_heldout(s.id, 0.25)]
    assert held and len(held) < HELDOUT_SEEDS
    assert updates[1].metrics["n_seeds"] == len(seeds) - len(held)
    # The held-out seeds are never trained on: they are what the NLL is measured on. The cold
    # start fills the pool beyond its own seeds, so that every version is measured on the same
    # HELDOUT_SEEDS seeds from the first one on.
    m = updates[1].metrics
    assert m["heldout_problem_nll_after"] < m["heldout_problem_nll_before"] - 0.1, m
    pool = [json.loads(line)["key"] for line in (tmp_path / "ckpt" / "heldout-seeds.jsonl").open()]
    first_held = [s.id for s in iter_seeds("gsm8k", "train") if is_heldout(s.id, 0.25)]
    assert sorted(pool) == sorted(first_held[:HELDOUT_SEEDS])
    # Checkpoints exist now: a restarted stage does not cold-start again.
    assert EStepStage(settings).start() == []
    store = CheckpointStore(tmp_path / "ckpt")
    assert [c.tag for c in store.list("prompt_model")] == ["v0001-cold_start"]
    assert [c.tag for c in store.list("solver")] == ["v0001-cold_start"]


def test_the_solver_learns_the_seeds_worked_solutions_in_its_answer_format(
    tmp_path, tiny_model_dir
):
    """The solver's cold start: the seeds' GSM8K solutions as the solver is asked to write them
    (steps, then a boxed answer), trained like the other models' cold start; the held-out seeds'
    solutions are its signal and never trained on. It is DPO's first anchor."""
    from llm.roles import Role
    from trainer.anchor import resolve
    from trainer.coldstart import cold_start, gold_solutions
    from trainer.em import EMTrainer

    settings = _settings(tmp_path, tiny_model_dir)
    trainer = EMTrainer.on_models(settings.trainer, settings.models)
    done = cold_start(settings, trainer)
    solver = [u for u in done.updates if u.role == Role.SOLVER]
    assert [u.version for u in solver] == ["solver/v0001-cold_start"]
    gold = gold_solutions(done.data.solved)
    held = {g.id for g in gold if is_heldout(g.problem_id, 0.25)}
    m = solver[0].metrics
    assert m["n_heldout_traces"] == len(held) >= 1 and m["n_traces"] == len(gold) - len(held)
    assert m["heldout_trace_nll_after"] < m["heldout_trace_nll_before"] - 0.1, m
    assert all(
        g.completion.endswith(f"\\boxed{{{s.answer}}}.") for g, s in zip(gold, done.data.solved)
    )
    store = CheckpointStore(tmp_path / "ckpt")
    trained = set(store.latest(Role.SOLVER).metadata["trained_ids"])
    assert trained == {g.id for g in gold} - held
    anchor = resolve(store.latest(Role.SOLVER), Role.SOLVER, str(tiny_model_dir), 0)
    assert anchor.version == "solver/v0001-cold_start"
    # Every model has a checkpoint: nothing to do, and the solver's cold start can be off.
    assert cold_start(settings, trainer) is None
    off = _settings(
        tmp_path / "off", tiny_model_dir, cold_start={**FAST, "seeds": 8, "solver": False}
    )
    done = cold_start(off, EMTrainer.on_models(off.trainer, off.models))
    assert [u.role for u in done.updates] == ["rationale_model", "prompt_model"]


def test_up_goes_on_from_the_base_models_when_the_cold_start_fails(tmp_path, capsys):
    """As the em stage does: a failed cold start before `up` runs its stages is one line, and
    the run goes on from the base models (nothing is published, no checkpoint is written)."""
    from promptcot.cli.launch import cold_start_first

    settings = _settings(tmp_path, tmp_path / "no-such-model")
    cold_start_first(settings, "127.0.0.1:1")  # no broker there: nothing may be published
    out = capsys.readouterr().out
    assert "cold start failed" in out and "base models" in out
    assert CheckpointStore(tmp_path / "ckpt").latest("prompt_model") is None


def test_train_cold_start_command(tmp_path, tiny_model_dir, monkeypatch):
    from promptcot.cli import app

    for role in ("PROMPT_MODEL", "RATIONALE_MODEL", "SOLVER"):
        monkeypatch.setenv(f"PROMPTCOT_MODELS__{role}__MODEL", str(tiny_model_dir))
    monkeypatch.setenv(
        "PROMPTCOT_TRAINER",
        json.dumps({"checkpoint_dir": str(tmp_path / "ckpt"), "cold_start": FAST}),
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "cold-start", "--seeds", "6"])
    assert result.exit_code == 0, result.output
    assert "annotated 6 seeds (100.0%" in result.output
    assert "prompt_model/v0001-cold_start" in result.output
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest("rationale_model").tag == "v0001-cold_start"
    again = runner.invoke(app, ["train", "cold-start", "--seeds", "6"])
    assert again.exit_code == 0 and "already cold-started" in again.output
    assert runner.invoke(app, ["train", "cold-start", "--seeds", "0"]).exit_code != 0


@pytest.mark.slow
def test_cold_start_under_torchrun_trains_data_parallel_and_rank_0_writes(tmp_path, tiny_model_dir):
    """The documented several-GPU launch (docs/training.md), on CPU: two processes (gloo);
    with --publish, rank 0 alone announces the versions."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from streams.broker import EmbeddedBroker
    from streams.clients import kafka_python_config, read_all
    from streams.settings import KafkaSettings
    from streams.topics import ensure_topics

    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        ensure_topics(kafka_python_config(kafka, kafka.bootstrap_servers), kafka.namespace, 1, 1)
        env = {
            **os.environ,
            "PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "PROMPTCOT_MODELS__PROMPT_MODEL__MODEL": str(tiny_model_dir),
            "PROMPTCOT_MODELS__RATIONALE_MODEL__MODEL": str(tiny_model_dir),
            "PROMPTCOT_MODELS__SOLVER__MODEL": str(tiny_model_dir),
            "PROMPTCOT_TRAINER": json.dumps(
                {"checkpoint_dir": str(tmp_path / "ckpt"), "cold_start": FAST}
            ),
            "OMP_NUM_THREADS": "1",
        }
        torchrun = Path(sys.executable).with_name("torchrun")
        command = [str(torchrun), "--nproc_per_node", "2", "-m", "promptcot"]
        done = subprocess.run(
            [*command, "train", "cold-start", "--seeds", "8", "--publish"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        topic = MODELS.full_name(kafka.namespace)
        announced = list(read_all(kafka, kafka.bootstrap_servers, topic))
    store = CheckpointStore(tmp_path / "ckpt")
    for role in ("rationale_model", "prompt_model", "solver"):
        assert [c.tag for c in store.list(role)] == ["v0001-cold_start"]  # one, not one a rank
    assert done.stdout.count("annotated 8 seeds") == 1  # rank 0 reports, the other is quiet
    assert len(announced) == 3  # one update per role, from rank 0 only


def test_up_publishes_seeds_the_cold_start_did_not_train_on(tmp_path):
    """With the trainer among its stages, `up` publishes the seeds after the cold start's: the
    M-steps then learn from problems p_θ was not fitted on (revisiting the cold start's own seeds
    held the held-out NLL flat, then raised it; docs/training.md, "The experiment")."""
    from promptcot.startup import up_seeds

    settings = _settings(tmp_path, tmp_path / "unused")
    data = cold_start_data(settings)
    cold = {s.seed_id for s in data.seeds if not is_heldout(s.seed_id, 0.25)}  # trained on
    loop = up_seeds(settings, ["annotate", "rationale", "em"], 6)
    assert len(loop) == 6 and not cold & {s.id for s in loop}
    assert [s.id for s in loop] == [s.id for s in load_seeds("gsm8k", "train", 6, skip=8)]
    # A pure generator has no cold start: it publishes from the first seed on.
    plain = up_seeds(settings, ["annotate", "generate"], 6)
    assert [s.id for s in plain] == [s.id for s in load_seeds("gsm8k", "train", 6)]


def test_up_shows_the_cold_start_as_one_progress_bar_and_logs_its_details(
    tmp_path, tiny_model_dir, capfd, monkeypatch
):
    """`up`'s console gets one progress bar for the cold start (its phase as the description)
    and the line with the versions; the trainer's dicts, Hugging Face's warnings and progress
    bars go to the cold start's log file, not to stdout or stderr."""
    import io

    from rich.console import Console

    from promptcot.cli import launch
    from streams.broker import EmbeddedBroker
    from streams.clients import read_all
    from streams.cluster import kafka_python_config
    from streams.topics import ensure_topics

    settings = _settings(tmp_path, tiny_model_dir)
    settings.sink.output_dir = tmp_path / "out"
    screen = io.StringIO()
    monkeypatch.setattr(launch, "console", Console(file=screen, force_terminal=True, width=120))
    with EmbeddedBroker() as broker:
        kafka = settings.kafka
        kafka.bootstrap_servers = broker.bootstrap_servers
        ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 1, 1)
        launch.cold_start_first(settings, broker.bootstrap_servers)
        announced = list(
            read_all(kafka, broker.bootstrap_servers, MODELS.full_name(kafka.namespace))
        )
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out + err)[-3000:]  # nothing raw, nothing beside the console
    shown = screen.getvalue()
    phases = ("annotating seeds", "training rationale_model", "training prompt_model")
    for phase in (*phases, "training solver"):
        assert f"cold start: {phase}" in shown, shown[-3000:]
    assert "━" in shown  # a bar
    assert "train_runtime" not in shown and "{'" not in shown and "tokenizer" not in shown
    log = tmp_path / "out" / "logs" / "cold-start.log"
    versions = "rationale_model/v0001-cold_start, prompt_model/v0001-cold_start, "
    assert f"{versions}solver/v0001-cold_start (details: {log})" in " ".join(shown.split())
    details = log.read_text()
    assert "train_loss" in details and "saved checkpoint" in details, details[-3000:]
    assert len(announced) == 3  # p_θ, q_φ and the solver
