"""`promptcot eval`: a model as a solver on a fixed benchmark subset, the solver's own template,
answers checked by the verifier's oracle, JSON out and a Prometheus gauge per version."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from streams import metrics
from trainer.evaluate import evaluate_path, load_problems, score
from trainer.settings import EvalConfig


def test_benchmarks_load_with_references_and_livecodebench_says_why_not():
    gsm = load_problems("gsm8k", 5)
    assert len(gsm) == 5 and gsm[0].reference == "18" and "Janet" in gsm[0].text
    for name in ("aime24", "aime25", "hmmt25"):
        problems = load_problems(name)
        assert len(problems) == 30 and all(p.reference for p in problems)
        assert not any("<|im_start|>" in p.text or "<think>" in p.text for p in problems)
    with pytest.raises(ValueError, match="not its tests"):
        load_problems("lcb_v5")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_problems("mmlu")


def test_answers_are_extracted_and_checked_by_the_verifiers_oracle():
    from verification.mathcheck import EquivalenceOracle

    problems = load_problems("gsm8k", 4)  # references 18, 3, 70000, 540
    solutions = [
        "She makes 9 * 2 = 18 dollars.\nThe answer is \\boxed{18}.",
        "It takes \\boxed{3.0} bolts.",
        "The profit is \\boxed{7000}.",
        "I do not know.",
    ]
    with EquivalenceOracle() as oracle:
        items = score(problems, solutions, oracle)
    assert [(i["answer"], i["correct"]) for i in items] == [
        ("18", True),
        ("3.0", True),
        ("7000", False),
        (None, False),
    ]


def test_evaluate_scores_a_model_and_sets_the_gauge_of_its_version(tiny_model_dir):
    result = evaluate_path(
        str(tiny_model_dir), EvalConfig(limit=6, max_tokens=48, batch_size=3), role="solver"
    )
    assert result.n == 6 and result.benchmark == "gsm8k" and 0 <= result.accuracy <= 1
    assert [i["id"] for i in result.items] == [f"test-{i}" for i in range(6)]
    assert all(i["finish"] in ("stop", "length") for i in result.items)
    assert result.correct == sum(i["correct"] for i in result.items)
    gauge = metrics.EVAL_ACCURACY.labels(benchmark="gsm8k", role="solver", version=result.version)
    assert gauge._value.get() == result.accuracy


def test_eval_command_writes_json_and_a_prometheus_file(tiny_model_dir, tmp_path):
    from promptcot.cli import app

    out, prom = tmp_path / "eval.json", tmp_path / "eval.prom"
    args = ["eval", str(tiny_model_dir), "--limit", "3", "--max-tokens", "32"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--prom", str(prom)])
    assert result.exit_code == 0, result.output
    assert "gsm8k: " in result.output and "/3 = " in result.output
    data = json.loads(out.read_text())
    assert data["n"] == 3 and len(data["items"]) == 3 and "accuracy" in data
    text = prom.read_text()
    assert f'version="{data["version"]}"' in text and "promptcot_eval_accuracy{" in text
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True)
        assert lint.returncode == 0
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert bad.exit_code != 0
    none = CliRunner().invoke(app, ["eval", "--benchmark", "lcb_v5", str(tiny_model_dir)])
    assert none.exit_code != 0


def test_eval_loads_a_model_folder_locally_even_when_the_role_is_served_over_http(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A folder is weights on disk: an openai solver's settings (a served model name) do not
    apply to it, the folder is scored in process."""
    from promptcot.cli import app

    monkeypatch.setenv("PROMPTCOT_MODELS__SOLVER__KIND", "openai")
    monkeypatch.setenv("PROMPTCOT_MODELS__SOLVER__BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("PROMPTCOT_MODELS__SOLVER__MAX_RETRIES", "0")
    out = tmp_path / "eval.json"
    args = ["eval", str(tiny_model_dir), "--limit", "2", "--max-tokens", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["version"].startswith(tiny_model_dir.name + "@")
    assert all(i["finish"] in ("stop", "length") for i in data["items"])


def test_the_trainer_scores_each_new_solver_version_when_asked(tmp_path, tiny_model_dir):
    from trainer_data import fast, pairs, trainer_settings

    from trainer.dpo import DPOTrainerLoop

    settings = trainer_settings(
        tmp_path,
        tiny_model_dir,
        heldout_fraction=0.0,
        dpo=fast(window={"min_records": 2}),
        eval={"after_dpo": True, "limit": 2, "max_tokens": 16, "batch_size": 2},
    )
    (update,) = DPOTrainerLoop(settings.trainer, str(tiny_model_dir)).run_window(pairs(4)).updates
    accuracy = update.metrics["eval_gsm8k_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    versions = [
        labels["version"]
        for labels, _ in metrics.gauge_samples(metrics.EVAL_ACCURACY)
        if labels["role"] == "solver"
    ]
    assert any(v.startswith("v0001-dpo@") for v in versions)  # the new checkpoint's weights


def test_the_trainer_evaluates_on_its_own_device_and_dtype(tmp_path, tiny_model_dir):
    from trainer_data import trainer_settings

    from trainer.dpo import eval_backend_settings
    from trainer.role_models import training_device

    settings = trainer_settings(tmp_path, tiny_model_dir, device="auto", dtype="bfloat16")
    backend = eval_backend_settings(settings.trainer)
    assert (backend.device, backend.dtype) == (training_device("auto"), "bfloat16")
    settings = trainer_settings(tmp_path, tiny_model_dir, device="meta", dtype="float32")
    assert eval_backend_settings(settings.trainer).device == "meta"
