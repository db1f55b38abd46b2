"""The GPU check (ops/gpu-check.sh, bench/gpu_check.py, bench/gpu_env.py) on CPU, so it never rots:
its `--cpu` smoke runs every training step of the gpu profile through the project's own code and
reports what each step trained and computed in; the environment half installs carried wheels
offline (pip --no-index) and names in one line what nothing carried provides."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench import gpu_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "setup: random init, save",
    "cold-start data (annotate)",
    "load q_φ, p_θ",
    "cold start (q_φ, p_θ)",
    "E-step (q_φ)",
    "M-step (p_θ)",
    "load solver",
    "DPO window (solver)",
    "eval (2 GSM8K)",
]
TRAINING = ["cold start (q_φ, p_θ)", "E-step (q_φ)", "M-step (p_θ)", "DPO window (solver)"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir) -> tuple[subprocess.CompletedProcess, dict]:
    """`ops/gpu-check.sh run --cpu` once (about a minute on 2 cores), with the tests' tiny model's
    tokenizer."""
    out = tmp_path_factory.mktemp("gpu-check") / "check.json"
    done = subprocess.run(
        ["bash", "ops/gpu-check.sh", "run", "--cpu", "--model-dir", str(tiny_model_dir)]
        + ["--out", str(out)],
        cwd=ROOT,
        env={**_env(), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _by_step(report: dict) -> dict[str, dict]:
    return {r["step"]: r for r in report["records"]}


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_of_the_gpu_profile_and_prints_the_table(smoke):
    done, report = smoke
    assert [r["step"] for r in report["records"]] == STEPS
    assert not [r["error"] for r in report["records"] if r["error"]]
    steps = _by_step(report)
    for name in TRAINING:
        rec = steps[name]
        assert rec["trained"] == ["float32"], name  # fp32 master weights (docs/training.md)
        assert rec["devices"] and set(rec["devices"]) == {"cpu"} and not rec["misplaced"], name
        assert math.isfinite(rec["metrics"].get("train_loss", 0.0)), name
        assert rec["loss"], name
    cold = steps["cold start (q_φ, p_θ)"]["metrics"]
    assert set(cold) == {"rationale_model", "prompt_model"}
    assert all(math.isfinite(m["train_loss"]) for m in cold.values())
    # Every training runs under bf16 autocast on float32 weights (below), and the held-out
    # signals beside it are measured in the weights' own precision, the same before and after.
    # DPO's reference log-probs are computed under the autocast its policy trains under.
    for name in TRAINING:
        evals = {tuple(m) for m in steps[name]["matmuls"] if m[0] == "eval"}
        assert ("eval", "float32", "float32", "off") in evals, (name, evals)
        reference = {("eval", "float32", "bfloat16", "bfloat16")} if "DPO" in name else set()
        assert evals - {("eval", "float32", "float32", "off")} == reference, (name, evals)
    # The eval loads the solver in the profile's dtype, on the training device.
    ev = steps["eval (2 GSM8K)"]
    assert {tuple(m[:2]) for m in ev["matmuls"]} == {("eval", "bfloat16")}
    assert set(ev["devices"]) == {"cpu"} and ev["loss"].startswith("acc ")
    # The table: every step with its loss, and the wall time of the one process.
    for name in STEPS:
        assert name in done.stdout
    assert "q " in done.stdout and "s 0." in done.stdout and "wall: " in done.stdout
    assert "trl" not in report["packages"] and "datasets" not in report["packages"]


@pytest.mark.slow
def test_every_training_of_the_gpu_profile_runs_under_bf16_autocast(smoke):
    """The HF Trainer's accelerator wrapped only a model's first training in autocast (it marks
    the model prepared); the engine enters torch.autocast on every training forward."""
    _, report = smoke
    for name in TRAINING:
        train = [m for m in _by_step(report)[name]["matmuls"] if m[0] == "train"]
        assert train == [["train", "float32", "bfloat16", "bfloat16"]], name


@pytest.mark.slow
def test_the_check_imports_nothing_outside_what_it_checks_and_carries(smoke):
    """Every distribution the check imported is in the requirement closure that ``ensure``
    verifies on the GPU machine (or one it does not check: NOT_CHECKED)."""
    _, report = smoke
    checked = set(gpu_env.closure(gpu_env.pyproject_requirements()))
    assert set(report["imported"]) - checked - gpu_env.NOT_CHECKED == set()
    # What the CUDA image lacks travels; the trainer no longer imports TRL or datasets.
    assert {"peft", "pydantic", "pydantic-core"} <= set(gpu_env.CARRIED)
    assert not {"trl", "datasets"} & set(report["imported"])
    assert not {"trl", "datasets"} & set(gpu_env.CARRIED)


# ---------------------------------------------------------------------------------------------
# The environment half: requirements and the offline install


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel holding one module named after the distribution."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def test_unmet_checks_what_the_project_imports_or_carries_not_the_images_own_packages():
    dists = {
        "datasets": gpu_env.Dist("5.0.1", ("dill<0.4.2", "fsspec[http]<=2026.6.0", "pandas")),
        "dill": gpu_env.Dist("0.4.2"),
        "fsspec": gpu_env.Dist("2026.6.0", ("aiohttp; extra == 'http'", "gone; extra == 'gs'")),
        "pandas": gpu_env.Dist("2.2.0", ("pytz>=2020.1",)),  # the image's: pytz not followed
        "torch": gpu_env.Dist("2.11.0+cu130", ("nvidia-cublas==13",)),  # the image's CUDA stack
    }
    roots = [Requirement("datasets>=3"), Requirement("torch")]
    found = gpu_env.unmet(roots, dists.get, gpu_env.ours(roots, ["dill", "fsspec"]))
    assert [(u.name, u.found) for u in found] == [("aiohttp", None), ("dill", "0.4.2")]
    assert found[1].line() == "dill 0.4.2 is installed (datasets 5.0.1 needs dill<0.4.2)"
    assert found[0].line() == "aiohttp is missing (fsspec 2026.6.0 needs aiohttp)"
    # The versions printed: the whole closure but torch's own requirements.
    assert set(gpu_env.closure(roots, dists.get)) == {
        "datasets",
        "dill",
        "fsspec",
        "pandas",
        "torch",
    }


def test_ensure_installs_what_is_missing_from_the_carried_wheels_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # ensure() puts its target first
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "promptcot-probe-app", "1.0", ("promptcot-probe-dep>=2",))
    _wheel(wheels, "promptcot-probe-dep", "2.0")
    target = tmp_path / "site-packages"
    found = gpu_env.ensure(wheels, target, [Requirement("promptcot-probe-app==1.0")])
    # Two rounds: the app, then the dependency its metadata asks for.
    assert found == {"promptcot-probe-app": "1.0 (carried)", "promptcot-probe-dep": "2.0 (carried)"}
    assert (target / "promptcot_probe_dep" / "__init__.py").is_file()
    # Importable here and in subprocesses (the eval's math oracle runs in one).
    probe = "import promptcot_probe_dep as m; print(m.VERSION)"
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert child.stdout.strip() == "2.0", child.stderr
    # What the interpreter has already is used as it is, and nothing is installed.
    again = gpu_env.ensure(None, tmp_path / "unused", [Requirement("packaging")])
    assert list(again) == ["packaging"] and not (tmp_path / "unused").exists()


def test_ensure_names_in_one_line_what_no_carried_wheel_meets(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "promptcot-probe-lib", "1.5")
    with pytest.raises(gpu_env.EnvironmentProblem) as missing:
        gpu_env.ensure(wheels, tmp_path / "site", [Requirement("promptcot-probe-other>=1")])
    assert str(missing.value) == (
        "gpu-check: promptcot-probe-other is missing (pyproject.toml needs "
        "promptcot-probe-other>=1); not carried"
    )
    with pytest.raises(gpu_env.EnvironmentProblem) as wrong:
        gpu_env.ensure(wheels, tmp_path / "site", [Requirement("promptcot-probe-lib>=2")])
    assert "carried: 1.5" in str(wrong.value) and "\n" not in str(wrong.value)
    with pytest.raises(gpu_env.EnvironmentProblem) as bare:
        gpu_env.ensure(None, tmp_path / "site", [Requirement("promptcot-probe-lib")])
    assert str(bare.value).endswith("(no wheel folder: run `ops/gpu-check.sh prepare` first)")
