"""The deployment files (ops/compose, ops/k8s) say what the factory can run: every stage they
start exists, every setting they pass (mounted YAML and PROMPTCOT_* variables) is a valid setting,
the filter runs as one owner plus a standby, the trainer and model servers get GPUs, workers get
the grace period and probes the runtime needs. Schema validation itself is ops/validate.sh
(docker-compose config, kubernetes-validate)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from promptcot.registry import STAGES, TRAINER_STAGES
from promptcot.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "ops/compose"
K8S_DIR = ROOT / "ops/k8s"
# Stages a deployment runs as workers: every registered stage.
WORKER_STAGES = set(STAGES)


def _compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())  # merge keys resolved


def _factory_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("${PROMPTCOT")
    }


def _k8s_objects() -> list[dict]:
    return [
        obj
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for obj in yaml.safe_load_all(path.read_text())
        if obj
    ]


def _pod_specs(objects: list[dict]) -> dict[str, dict]:
    return {
        obj["metadata"]["name"]: obj["spec"]["template"]["spec"]
        for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def _settings_with(monkeypatch, config: Path, env: dict[str, str]):
    for name in list(os.environ):
        if name.startswith("PROMPTCOT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name != "PROMPTCOT_CONFIG":
            monkeypatch.setenv(name, value)
    return load_settings(config)


def test_manifests_are_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("build", K8S_DIR / "build_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = {p.name: p.read_text() for p in K8S_DIR.glob("*.yaml")}
    assert written == module.manifests(), "run ops/k8s/build_manifests.py"


def test_compose_runs_every_stage_with_valid_settings(monkeypatch):
    services = _factory_services(_compose())
    commands = {name: svc["command"] for name, svc in services.items()}
    assert commands.pop("topics") == ["topics"]
    assert {c[1] for c in commands.values()} == WORKER_STAGES
    for name, svc in services.items():
        env = svc["environment"]
        assert env["PROMPTCOT_CONFIG"] == "/etc/promptcot/factory.yaml"
        settings = _settings_with(monkeypatch, COMPOSE_DIR / "factory.yaml", env)
        assert settings.kafka.bootstrap_servers == "kafka:9092", name
        assert settings.metrics.host == "0.0.0.0" and settings.metrics.port == 9464
        _check_models(name, settings)


def _check_models(name: str, settings) -> None:
    """Workers call the vLLM servers by role name; the trainer loads weight folders itself."""
    for role in ("prompt_model", "rationale_model", "solver"):
        cfg = settings.models.role(role)
        if name in TRAINER_STAGES and cfg.kind != "openai":
            assert cfg.model.startswith("/models/"), (name, role)
        else:
            assert cfg.kind == "openai" and cfg.model == role, (name, role)


def test_compose_filter_trainer_and_grace_period():
    compose = _compose()
    services = _factory_services(compose)
    filters = [n for n, s in services.items() if s["command"] == ["worker", "filter"]]
    assert sorted(filters) == ["filter", "filter-standby"]
    for name in TRAINER_STAGES:
        if name in services:
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name, svc in compose["services"].items():
        if name.startswith("vllm-"):
            assert svc["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert all(s["stop_grace_period"] == "30s" for s in services.values())


def test_compose_mounts_files_that_exist():
    for name, svc in _compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")) and "${" not in source:
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_compose_prometheus_config_is_valid(tmp_path):
    config = (COMPOSE_DIR / "prometheus/prometheus.yml").read_text()
    shutil.copy(ROOT / "ops/prometheus/alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(tmp_path / "alerts.yml"))
    )
    result = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_runs_every_stage_with_valid_settings(monkeypatch, tmp_path):
    objects = _k8s_objects()
    config_map = next(o for o in objects if o["metadata"]["name"] == "promptcot-config")
    secret = next(o for o in objects if o["metadata"]["name"] == "promptcot-secrets")
    config = tmp_path / "factory.yaml"
    config.write_text(config_map["data"]["factory.yaml"])
    stages = set()
    for name, spec in _pod_specs(objects).items():
        for container in spec["containers"]:
            if not container["image"].startswith("promptcot-factory"):
                continue
            args = container["args"]
            if args[0] == "worker":
                stages.add(args[1])
            env = {e["name"]: e["value"] for e in container["env"]}
            if any(ref["secretRef"]["name"] == "promptcot-secrets" for ref in container["envFrom"]):
                env.update(secret["stringData"])
            settings = _settings_with(monkeypatch, config, env)
            _check_models(name, settings)
            assert settings.vectorstore.store.uri.startswith("s3://"), name
            assert settings.kafka.sasl_password is not None, name
    assert stages == WORKER_STAGES


def test_k8s_filter_gpus_probes_and_grace_period():
    objects = _k8s_objects()
    filters = [o for o in objects if o["kind"] == "StatefulSet"]
    assert sorted(o["metadata"]["name"] for o in filters) == ["filter", "filter-standby"]
    assert all(o["spec"]["replicas"] == 1 for o in filters)
    port = load_settings().metrics.port
    for name, spec in _pod_specs(objects).items():
        container = spec["containers"][0]
        gpu = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if name in TRAINER_STAGES or name.startswith("vllm-"):
            assert gpu == 1 and spec["tolerations"] and spec["nodeSelector"], name
        else:
            assert gpu is None, name
        if container["image"].startswith("promptcot-factory") and name != "promptcot-topics":
            assert spec["terminationGracePeriodSeconds"] == 30, name
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
