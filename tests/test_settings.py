"""Settings: one typed object from defaults, PROMPTCOT_* env vars and an optional YAML file."""

import pytest

from streams.settings import load_settings


def test_defaults_are_the_embedded_factory(monkeypatch):
    monkeypatch.delenv("PROMPTCOT_CONFIG", raising=False)
    s = load_settings()
    assert s.kafka.bootstrap_servers is None  # -> embedded broker
    assert s.verify.max_pass_rate == 0.5 and s.verify.min_pass_rate == 0.0


def test_env_vars_override_nested_fields(monkeypatch):
    monkeypatch.delenv("PROMPTCOT_CONFIG", raising=False)
    monkeypatch.setenv("PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("PROMPTCOT_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("PROMPTCOT_VERIFY__ROLLOUTS", "16")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.verify.rollouts == 16
    assert "s3cret" not in s.model_dump_json()  # secrets never printed


def test_yaml_file_and_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "factory.yaml"
    cfg.write_text("kafka:\n  namespace: team-a\n  partitions: 6\nverify:\n  rollouts: 4\n")
    monkeypatch.setenv("PROMPTCOT_VERIFY__ROLLOUTS", "12")
    s = load_settings(cfg)
    assert s.kafka.namespace == "team-a" and s.kafka.partitions == 6
    assert s.verify.rollouts == 12  # env beats the file


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")


def test_unknown_keys_are_rejected(tmp_path, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka:\n  bootstrap: oops\n")
    with pytest.raises(Exception, match="bootstrap"):
        load_settings(cfg)
