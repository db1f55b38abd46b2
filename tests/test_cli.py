"""The CLI: help everywhere, settings printout, schemas, topics, export, and clear errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from promptcot.cli import app
from promptcot.cli.app import parse_duration
from streams.records import RECORD_TYPES, Verdict
from workers.stages.sink import SinkStage

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["up"],
        ["worker"],
        ["broker"],
        ["topics"],
        ["tail"],
        ["export"],
        ["schemas"],
        ["config"],
        ["models", "prepare"],
        ["seeds", "load"],
        ["report"],
        ["dlq"],
        ["dlq", "counts"],
        ["dlq", "show"],
        ["dlq", "replay"],
        ["train", "cold-start"],
        ["eval"],
    ],
)
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_config_prints_effective_settings_with_env_override(monkeypatch):
    monkeypatch.setenv("PROMPTCOT_KAFKA__NAMESPACE", "team-x")
    monkeypatch.setenv("PROMPTCOT_KAFKA__SASL_PASSWORD", "hunter2")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    assert "namespace: team-x" in result.output
    assert "hunter2" not in result.output


def test_schemas_written_for_every_record_type(tmp_path):
    result = runner.invoke(app, ["schemas", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in tmp_path.glob("*.schema.json"))
    assert files == sorted(f"{kind}.schema.json" for kind in RECORD_TYPES)
    verdict = json.loads((tmp_path / "verdict.schema.json").read_text())
    assert verdict["x-topics"] == ["verdicts"] and "reason" in verdict["properties"]


def test_topics_lists_the_catalogue_under_the_namespace(monkeypatch):
    monkeypatch.setenv("PROMPTCOT_KAFKA__NAMESPACE", "ns1")
    result = runner.invoke(app, ["topics"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in (
        "ns1.concepts",
        "ns1.candidates",
        "ns1.verdicts",
        "ns1.problems",
        "ns1.deadletter",
    ):
        assert name in result.output


def test_worker_without_a_cluster_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    result = runner.invoke(app, ["worker", "generate"])
    assert result.exit_code != 0
    assert "BOOTSTRAP_SERVERS" in result.output


def test_unknown_stage_is_rejected():
    result = runner.invoke(app, ["worker", "nonsense", "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 2 and "unknown stage" in result.output


def test_export_writes_each_problem_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTCOT_SINK__OUTPUT_DIR", str(tmp_path / "out"))
    from promptcot.settings import load_settings

    sink = SinkStage(load_settings())
    sink.ensure_ready()
    verdict = Verdict(
        subject_id="cand_1",
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        problem="What is 6*7?",
        reference_answer="42",
        reference_source="designer",
        pass_rate=0.25,
    )
    rejected = Verdict(
        subject_id="cand_2", stage="verify", accepted=False, reason="too_easy", domain="math"
    )
    sink.process([verdict, rejected])
    sink.process([verdict])  # a redelivery
    out = tmp_path / "problems.parquet"
    result = runner.invoke(app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["candidate_id"] for r in rows] == ["cand_1"]
    assert rows[0]["reference_answer"] == "42"
    assert rows[0]["reference_source"] == "designer"  # the product says where it came from


def test_durations():
    assert (
        parse_duration("90s") == 90
        and parse_duration("25m") == 1500
        and parse_duration("1h30m") == 5400
    )
    assert parse_duration("12") == 12
    with pytest.raises(typer.BadParameter):
        parse_duration("ten minutes")


def test_up_trains_by_default_and_no_train_makes_a_pure_generator():
    from promptcot.registry import DATA_STAGES, TRAINER_STAGES
    from promptcot.startup import stage_names

    assert "--no-train" in runner.invoke(app, ["up", "--help"]).output
    assert {"em", "dpo", "sft"} <= set(TRAINER_STAGES)  # `up` trains by default with all three
    assert stage_names(None, train=True) == [*DATA_STAGES, *TRAINER_STAGES]
    assert stage_names(None, train=False) == list(DATA_STAGES)
    assert stage_names("generate,sink", train=False) == ["generate", "sink"]
    # A list of stages is what runs: the trainer only where it is named.
    assert stage_names("sampler", train=True) == ["sampler"]
    assert stage_names("generate,em", train=True) == ["generate", "em"]
    with pytest.raises(typer.BadParameter, match="unknown stages"):
        stage_names("generat", train=False)


def test_up_serves_each_trained_role_from_its_newest_checkpoint(tmp_path):
    from promptcot.settings import Settings
    from promptcot.startup import serve_newest
    from trainer.checkpoints import CheckpointStore

    store = CheckpointStore(tmp_path, keep_last=5)
    for step in ("cold_start", "m_step"):
        newest = store.save("prompt_model", step, lambda d: None)
    settings = Settings(trainer={"checkpoint_dir": tmp_path})
    serve_newest(settings)
    assert settings.models.prompt_model.model == str(newest.path)
    assert settings.models.solver.model == ""  # no checkpoint: the embedded default


def test_up_ephemeral_leaves_no_scratch_folder_behind_on_an_error(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PROMPTCOT_TRAINER__DTYPE", "float8")  # the settings do not load
    result = runner.invoke(app, ["up", "--ephemeral", "--stages", "sampler", "--seeds", "0"])
    assert result.exit_code != 0
    assert list(tmp_path.glob("promptcot-ephemeral-*")) == []


def test_summary_says_where_the_problems_are_and_an_ephemeral_run_points_nowhere(tmp_path):
    """An --ephemeral run removes its sink before the summary prints: the summary must not
    name that folder."""
    from promptcot.progress import where_problems_are

    kept = where_problems_are(2, tmp_path).plain
    assert kept.startswith(f"verified problems: {tmp_path.resolve() / 'problems'} ")
    gone = where_problems_are(2, None).plain
    assert gone.startswith("2 verified problems, not kept") and str(tmp_path) not in gone
    assert where_problems_are(0, None).plain.startswith("no problem passed verification")


def test_worker_help_says_what_each_stage_does():
    from promptcot.registry import STAGES

    text = " ".join(runner.invoke(app, ["worker", "--help"]).output.split())
    for name, spec in STAGES.items():
        assert spec.doc and f"{name}: {spec.doc}" in text
