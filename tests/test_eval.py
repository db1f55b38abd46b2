"""`promptcot eval`: a model as a solver on a fixed benchmark subset, the solver's own template,
answers checked by the verifier's oracle, JSON out and a Prometheus gauge per version."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from llm.prompts import SOLVER_MATH
from streams import metrics
from trainer import stats
from trainer.evaluate import compare, evaluate_path, load_problems, score, subset_ids
from trainer.settings import EvalConfig


def test_benchmarks_load_with_references_and_livecodebench_says_why_not():
    gsm = load_problems("gsm8k", 5, items="all")
    assert [p.id for p in gsm] == [f"test-{i}" for i in range(5)]
    assert gsm[0].reference == "18" and "Janet" in gsm[0].text
    assert len(load_problems("gsm8k", items="all")) == 1319
    for name in ("aime24", "aime25", "hmmt25"):
        problems = load_problems(name)
        assert len(problems) == 30 and all(p.reference for p in problems)
        assert not any("<|im_start|>" in p.text or "<think>" in p.text for p in problems)
        assert not any(p.solution for p in problems)  # no worked solutions: no gold NLL
    with pytest.raises(ValueError, match="not its tests"):
        load_problems("lcb_v5")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_problems("mmlu")


def test_the_default_gsm8k_set_is_the_written_down_subset_of_300():
    """The ids file is the item set: 300 distinct test problems, in the draw order its rule
    states, and the questions behind them are the ones it was drawn on."""
    import corpora

    data = json.loads(corpora.path("gsm8k", "test-subset-300.json").read_text())
    ids = subset_ids("gsm8k")
    assert ids == data["ids"] and len(ids) == len(set(ids)) == 300
    assert ids == [f"test-{i}" for i in random.Random(17).sample(range(1319), 300)]
    problems = load_problems("gsm8k")
    assert [p.id for p in problems] == ids
    rows = [json.loads(line) for line in corpora.path("gsm8k", "test.jsonl").open()]
    joined = "\n".join(rows[int(i.split("-")[1])]["question"] for i in ids)
    assert hashlib.sha256(joined.encode()).hexdigest() == data["questions_sha256"]
    assert [p.id for p in load_problems("gsm8k", 7)] == ids[:7]


def test_gold_solutions_are_in_the_solvers_final_format():
    """GSM8K's `<<48/2=24>>` calculator notes go, its `#### N` becomes the boxed last line the
    solver is asked for, and the verifier reads the reference back from it."""
    from verification.mathcheck import extract_answer

    problems = load_problems("gsm8k", 40, items="all")
    for p in problems:
        assert p.solution and "<<" not in p.solution and "####" not in p.solution
        last = p.solution.splitlines()[-1]
        assert last == f"The answer is \\boxed{{{p.reference}}}."
        assert extract_answer(p.solution) == p.reference
    first = problems[0].solution.splitlines()
    assert first[0] == "Janet sells 16 - 3 - 4 = 9 duck eggs a day."


def test_answers_are_extracted_and_checked_by_the_verifiers_oracle():
    from verification.mathcheck import EquivalenceOracle

    problems = load_problems("gsm8k", 4, items="all")  # references 18, 3, 70000, 540
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
    assert [i["id"] for i in result.items] == subset_ids("gsm8k")[:6]
    assert all(i["finish"] in ("stop", "length") for i in result.items)
    assert result.correct == sum(i["correct"] for i in result.items)
    assert result.truncation_rate == sum(i["finish"] == "length" for i in result.items) / 6
    assert result.extracted_rate == sum(i["answer"] is not None for i in result.items) / 6
    low, high = result.accuracy_interval
    assert low <= result.accuracy <= high and high > 0  # Wilson: never [0, 0] on 6 items
    assert all(i["gold_tokens"] > 0 and math.isfinite(i["gold_nll"]) for i in result.items)
    nll = sum(i["gold_nll"] for i in result.items) / sum(i["gold_tokens"] for i in result.items)
    assert result.gold_nll_per_token == pytest.approx(nll) and nll > 0
    low, high = result.gold_nll_interval
    assert low <= nll <= high
    labels = {"benchmark": "gsm8k", "role": "solver", "version": result.version}
    assert metrics.EVAL_ACCURACY.labels(**labels)._value.get() == result.accuracy
    assert metrics.EVAL_GOLD_NLL.labels(**labels)._value.get() == pytest.approx(nll)


def test_gold_nll_only_skips_generation_and_matches_the_backends_own_scoring(tiny_model_dir):
    """--gold-nll-only: no solutions, the same NLL as a full run; and the one-item-at-a-time
    scorer agrees with the transformers backend's batched teacher-forced score()."""
    from llm.backends.base import BackendSettings
    from llm.backends.transformers_backend import TransformersBackend
    from trainer.evaluate import backend_gold_nll, gold_nll

    cfg = EvalConfig(limit=4, solve=False)
    result = evaluate_path(str(tiny_model_dir), cfg)
    assert not result.solved and result.accuracy is None and result.truncation_rate is None
    assert all("answer" not in i and i["gold_tokens"] > 0 for i in result.items)
    backend = TransformersBackend(BackendSettings(model=str(tiny_model_dir), max_batch_size=4))
    problems = load_problems("gsm8k", 4)
    mine = gold_nll(backend.model, backend.tokenizer, problems)
    assert [(i["gold_nll"], i["gold_tokens"]) for i in result.items] == mine
    theirs = backend.score(
        [SOLVER_MATH.render(backend, problem=p.text) for p in problems],
        [p.solution for p in problems],
    )
    assert [s.n_tokens for s in theirs] == [n for _, n in mine]
    assert [-s.total_logprob for s in theirs] == pytest.approx([x for x, _ in mine], rel=1e-4)
    assert backend_gold_nll(backend, problems) == mine


def test_a_backend_without_a_model_in_process_is_scored_by_its_own_score():
    from scripted_backend import ScriptedBackend

    from trainer.evaluate import backend_gold_nll

    problems = load_problems("gsm8k", 3)
    found = backend_gold_nll(ScriptedBackend(lambda prompt, i: ""), problems)
    assert found == [(float(len(p.solution.split())), len(p.solution.split())) for p in problems]


def test_gold_nll_is_finite_and_falls_after_one_sft_step_on_the_gold_solutions(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.evaluate import evaluate_gold
    from trainer.role_models import RoleModel
    from trainer.settings import StepConfig
    from trainer.sft import sft

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    before = evaluate_gold(model, tokenizer, 4, label="tiny")
    assert math.isfinite(before.gold_nll_per_token) and before.gold_tokens > 0
    examples = [
        {"prompt": SOLVER_MATH.render(tokenizer, problem=p.text), "completion": p.solution}
        for p in load_problems("gsm8k", 4)
    ]
    step = StepConfig(lr=3e-3, batch_size=4, per_device_batch_size=4, max_seq_len=1024)
    sft(RoleModel("solver", model, tokenizer, str(tiny_model_dir)), examples, step)
    after = evaluate_gold(model, tokenizer, 4, label="tiny+sft")
    assert after.gold_nll_per_token < before.gold_nll_per_token
    verdict = compare(after, before, names=("after", "before")).gold_nll.verdict
    assert verdict in ("after better", stats.NO_EVIDENCE)  # 4 items: the sign, not the proof


def test_eval_command_writes_json_and_a_prometheus_file(tiny_model_dir, tmp_path):
    from promptcot.cli import app

    out, prom = tmp_path / "eval.json", tmp_path / "eval.prom"
    args = ["eval", str(tiny_model_dir), "--limit", "3", "--max-tokens", "32"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--prom", str(prom)])
    assert result.exit_code == 0, result.output
    assert "gsm8k subset (3 items)" in result.output and "/3 = " in result.output
    assert "95% Wilson" in result.output and "gold NLL" in result.output
    data = json.loads(out.read_text())
    assert data["n"] == 3 and len(data["items"]) == 3 and data["item_set"] == "subset"
    for key in ("accuracy", "accuracy_interval", "truncation_rate", "extracted_rate"):
        assert data[key] is not None, key
    assert data["gold_nll_per_token"] > 0 and "boxed" in data["gold_format"]
    assert [i["id"] for i in data["items"]] == subset_ids("gsm8k")[:3]
    text = prom.read_text()
    assert f'version="{data["version"]}"' in text and "promptcot_eval_accuracy{" in text
    assert "promptcot_eval_gold_nll{" in text
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True)
        assert lint.returncode == 0
    bad = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert bad.exit_code != 0
    none = CliRunner().invoke(app, ["eval", "--benchmark", "lcb_v5", str(tiny_model_dir)])
    assert none.exit_code != 0

    # The run read back against the same model scored again: the same items, no difference.
    again = ["eval", "--compare", str(out), str(tiny_model_dir), "--limit", "3"]
    same = CliRunner().invoke(app, [*again, "--max-tokens", "32", "--out", str(tmp_path / "c")])
    assert same.exit_code == 0, same.output
    both = json.loads((tmp_path / "c").read_text())
    assert both["n"] == 3
    assert both["accuracy"]["verdict"] == both["gold_nll_per_token"]["verdict"] == stats.NO_EVIDENCE
    assert both["gold_nll_per_token"]["difference"] == 0.0
    assert same.output.count("no evidence of a difference") == 2


def _damaged_copy(model_dir, out):
    """The model with noise on every weight: a worse solver of anything."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)  # gold NLL 8.7 -> 19 nats/token
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(out)
    return out


def test_compare_tells_a_model_from_a_damaged_copy_by_gold_nll(tiny_model_dir, tmp_path):
    from promptcot.cli import app

    damaged = _damaged_copy(tiny_model_dir, tmp_path / "damaged")
    args = ["eval", "--compare", str(tiny_model_dir), str(damaged), "--gold-nll-only"]
    result = CliRunner().invoke(app, [*args, "--limit", "8", "--out", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    nll = data["gold_nll_per_token"]
    assert nll["n"] == 8 and nll["a"] < nll["b"] and nll["high"] < 0
    assert nll["verdict"] == "A better" and "gold NLL per token" in result.output
    assert data["accuracy"] is None and "not solved" in data["notes"][0]
    flipped = CliRunner().invoke(
        app,
        ["eval", "--compare", str(damaged), str(tiny_model_dir), "--gold-nll-only", "--limit", "8"],
    )
    assert flipped.exit_code == 0 and ": B better" in flipped.output


def _result(correct: list[bool], ids: list[str] | None = None) -> dict:
    ids = ids or [f"test-{i}" for i in range(len(correct))]
    items = [
        {"id": i, "reference": "1", "answer": "1" if c else "2", "correct": c, "finish": "stop"}
        for i, c in zip(ids, correct)
    ]
    return {
        "benchmark": "gsm8k",
        "model": "m",
        "version": "v",
        "n": len(items),
        "items": items,
        "max_tokens": 256,
    }


def test_compare_of_two_results_with_a_known_discordance(tmp_path):
    """20 items: A solves 10 that B misses and B 1 that A misses (McNemar exact p = 2 * 12 /
    2**11 = 0.0117): A better. 4 vs 2 discordant: no evidence. Results on other items: refused."""
    from promptcot.cli import app

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([True] * 10 + [False] + [True] * 3 + [False] * 6)))
    b.write_text(json.dumps(_result([False] * 10 + [True] + [True] * 3 + [False] * 6)))
    out = tmp_path / "c.json"
    result = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    accuracy = json.loads(out.read_text())["accuracy"]
    assert accuracy["p_value"] == pytest.approx(2 * 12 / 2**11)
    assert accuracy["difference"] == pytest.approx(9 / 20) and accuracy["low"] > 0
    assert accuracy["verdict"] == "A better" and "accuracy: A 65.0%, B 20.0%" in result.output
    b.write_text(json.dumps(_result([False] * 4 + [True] * 2 + [True] * 3 + [False] * 11)))
    a.write_text(json.dumps(_result([True] * 4 + [False] * 2 + [True] * 3 + [False] * 11)))
    result = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b)])
    assert result.exit_code == 0 and "no evidence of a difference" in result.output
    b.write_text(json.dumps(_result([True] * 20, ids=[f"test-{i}" for i in range(1, 21)])))
    refused = CliRunner().invoke(app, ["eval", "--compare", str(a), str(b)])
    assert refused.exit_code != 0 and "different items (20 and 20, 19 shared)" in str(
        refused.exception
    )


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
    assert update.metrics["eval_gsm8k_gold_nll"] > 0  # the gold solutions, teacher-forced
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
