"""Settings: one strict typed tree from defaults, PROMPTCOT_* env vars and an optional YAML file."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from promptcot.settings import Settings, SettingsError, load_settings, sources
from streams.settings import Section
from trainer.settings import PROFILE_WINDOWS


def _window(s: Settings, stage: str, key: str) -> float:
    """The trainer stage's window as the settings' trainer profile sizes it."""
    return PROFILE_WINDOWS[s.trainer.profile][stage][key]


@pytest.fixture(autouse=True)
def _no_config_env(monkeypatch):
    monkeypatch.delenv("PROMPTCOT_CONFIG", raising=False)


def test_defaults_are_the_embedded_factory():
    s = load_settings()
    assert s.kafka.bootstrap_servers is None  # -> embedded broker
    assert s.verify.max_pass_rate == 0.5 and s.verify.min_pass_rate == 0.0
    assert s.trainer.profile in ("cpu", "gpu")  # "auto" is resolved when the settings load
    assert s.stage("em").batch_within_s == _window(s, "em", "batch_within_s")
    assert s.stage("generate").batch_size == 8


def test_env_vars_override_nested_fields(monkeypatch):
    monkeypatch.setenv("PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("PROMPTCOT_KAFKA__SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("PROMPTCOT_VERIFY__ROLLOUTS", "16")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert s.verify.rollouts == 16
    assert "s3cret" not in s.model_dump_json()  # secrets never printed


def test_one_nested_env_key_leaves_its_siblings_alone(monkeypatch):
    monkeypatch.setenv("PROMPTCOT_STAGES__EM__BATCH_SIZE", "8")
    monkeypatch.setenv("PROMPTCOT_VERIFY__SANDBOX__LIMITS__CPU_SECONDS", "3")
    s = load_settings()
    assert s.stage("em").batch_size == 8
    # em's own default (from the trainer profile), not the generic 0.5 s
    assert s.stage("em").batch_within_s == _window(s, "em", "batch_within_s") > 60
    assert s.stage("generate").batch_size == 8 and s.stage("filter").batch_size == 32
    assert s.verify.sandbox.limits.cpu_seconds == 3
    assert s.verify.sandbox.limits.wall_seconds == Settings().verify.sandbox.limits.wall_seconds


def test_yaml_sets_one_key_of_a_mapping(tmp_path):
    cfg = tmp_path / "factory.yaml"
    cfg.write_text(
        "vectorstore:\n  dedup:\n    near_duplicate_threshold_by_domain: {math: 0.7}\n"
        "stages:\n  dpo: {batch_size: 4}\n"
    )
    s = load_settings(cfg)
    assert s.vectorstore.dedup.near_duplicate_threshold_by_domain == {"code": 0.88, "math": 0.7}
    assert s.stage("dpo").batch_size == 4
    assert s.stage("dpo").batch_within_s == _window(s, "dpo", "batch_within_s")


def test_yaml_file_and_env_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "factory.yaml"
    cfg.write_text("kafka:\n  namespace: team-a\n  partitions: 6\nverify:\n  rollouts: 4\n")
    monkeypatch.setenv("PROMPTCOT_VERIFY__ROLLOUTS", "12")
    s = load_settings(cfg)
    assert s.kafka.namespace == "team-a" and s.kafka.partitions == 6
    assert s.verify.rollouts == 12  # env beats the file
    where = sources(cfg)
    assert where["kafka.namespace"] == f"file {cfg}"
    assert where["verify.rollouts"] == "env PROMPTCOT_VERIFY__ROLLOUTS"
    assert "kafka.bootstrap_servers" not in where  # a default


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kafka: [unclosed\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(bad)


# One typo per section, at every depth: each is rejected with its full path and the nearest name.
TYPOS = [
    ({"kafka": {"partitons": 3}}, "kafka.partitons: unknown key; did you mean partitions?"),
    (
        {"embedded_broker": {"data_dri": "x"}},
        "embedded_broker.data_dri: unknown key; did you mean data_dir?",
    ),
    ({"stages": {"generat": {}}}, "stages.generat: unknown key; did you mean generate?"),
    (
        {"stages": {"em": {"batch_sise": 3}}},
        "stages.em.batch_sise: unknown key; did you mean batch_size?",
    ),
    (
        {"models": {"solver": {"kindd": "openai"}}},
        "models.solver.kindd: unknown key; did you mean kind?",
    ),
    ({"models": {"solvr": {}}}, "models.solvr: unknown key; did you mean solver?"),
    ({"concepts": {"set_sise": 4}}, "concepts.set_sise: unknown key; did you mean set_size?"),
    (
        {"sampler": {"max_in_flite": 4}},
        "sampler.max_in_flite: unknown key; did you mean max_in_flight?",
    ),
    (
        {"generation": {"temprature": 1}},
        "generation.temprature: unknown key; did you mean temperature?",
    ),
    ({"verify": {"rolouts": 3}}, "verify.rolouts: unknown key; did you mean rollouts?"),
    (
        {"verify": {"math": {"min_agrement": 0.3}}},
        "verify.math.min_agrement: unknown key; did you mean min_agreement?",
    ),
    (
        {"verify": {"sandbox": {"slotz": 4}}},
        "verify.sandbox.slotz: unknown key; did you mean slots?",
    ),
    (
        {"verify": {"sandbox": {"limits": {"cpu_second": 1}}}},
        "verify.sandbox.limits.cpu_second: unknown key; did you mean cpu_seconds?",
    ),
    (
        {"pairs": {"max_pairs_per_problm": 2}},
        "pairs.max_pairs_per_problm: unknown key; did you mean max_pairs_per_problem?",
    ),
    (
        {"traces": {"max_solver_traces_per_problm": 2}},
        "traces.max_solver_traces_per_problm: unknown key; did you mean "
        "max_solver_traces_per_problem?",
    ),
    (
        {"annotate": {"concept_sorce": "model"}},
        "annotate.concept_sorce: unknown key; did you mean concept_source?",
    ),
    ({"rationale": {"sample": 2}}, "rationale.sample: unknown key; did you mean samples?"),
    ({"vectorstore": {"stor": {}}}, "vectorstore.stor: unknown key; did you mean store?"),
    (
        {"vectorstore": {"embedder": {"devise": "cpu"}}},
        "vectorstore.embedder.devise: unknown key; did you mean device?",
    ),
    (
        {"vectorstore": {"decontam": {"ngram_sise": 9}}},
        "vectorstore.decontam.ngram_sise: unknown key; did you mean ngram_size?",
    ),
    (
        {"vectorstore": {"dedup": {"near_duplicate_treshold": 0.9}}},
        "vectorstore.dedup.near_duplicate_treshold: unknown key; did you mean "
        "near_duplicate_threshold?",
    ),
    ({"trainer": {"keep_lst": 2}}, "trainer.keep_lst: unknown key; did you mean keep_last?"),
    (
        {"trainer": {"eval": {"limt": 2}}},
        "trainer.eval.limt: unknown key; did you mean limit?",
    ),
    (
        {"trainer": {"cold_start": {"seed": 2}}},
        "trainer.cold_start.seed: unknown key; did you mean seeds?",
    ),
    (
        {"trainer": {"e_step": {"window": {"min_record": 2}}}},
        "trainer.e_step.window.min_record: unknown key; did you mean min_records?",
    ),
    (
        {"trainer": {"dpo": {"lora": {"alfa": 8}}}},
        "trainer.dpo.lora.alfa: unknown key; did you mean alpha?",
    ),
    ({"sink": {"output_dr": "x"}}, "sink.output_dr: unknown key; did you mean output_dir?"),
    ({"metrics": {"prt": 1}}, "metrics.prt: unknown key; did you mean port?"),
    (
        {"worker": {"shutdown_grace": 5}},
        "worker.shutdown_grace: unknown key; did you mean shutdown_grace_s?",
    ),
    ({"log_levl": "INFO"}, "log_levl: unknown key; did you mean log_level?"),
]


@pytest.mark.parametrize("values,line", TYPOS, ids=[line.split(":")[0] for _, line in TYPOS])
def test_a_typo_in_any_section_names_its_path_and_the_nearest_key(values, line):
    with pytest.raises(SettingsError) as err:
        Settings(**values)
    assert err.value.problems == [line]


def test_the_typo_cases_cover_every_section():
    sections = {next(iter(values)) for values, _ in TYPOS}
    assert sections - {"log_levl"} == set(Settings.model_fields) - {"log_level"}


def test_every_section_at_every_depth_is_strict():
    """A section class that is not a Section would accept typos silently."""
    seen: set[type] = set()

    def walk(cls: type[BaseModel]) -> None:
        seen.add(cls)
        for field in cls.model_fields.values():
            for arg in _types_in(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                    assert issubclass(arg, Section), f"{arg.__qualname__} is not a strict Section"
                    walk(arg)

    walk(Settings)
    assert len(seen) > 15


def _types_in(annotation):
    import typing

    yield annotation
    for arg in typing.get_args(annotation):
        yield from _types_in(arg)


def test_wrong_type_names_the_key_and_the_value():
    with pytest.raises(SettingsError) as err:
        Settings(kafka={"partitions": "many"})
    assert err.value.problems[0].startswith("kafka.partitions: Input should be a valid integer")
    assert "'many'" in err.value.problems[0]


def test_an_eval_benchmark_or_batch_size_the_trainer_cannot_use_fails_the_load():
    """Caught when the settings load, not after a DPO window trained."""
    with pytest.raises(SettingsError) as err:
        Settings(trainer={"eval": {"benchmark": "gsm8"}})
    assert err.value.problems[0].startswith("trainer.eval.benchmark: Input should be 'gsm8k'")
    with pytest.raises(SettingsError) as err:
        Settings(trainer={"eval": {"batch_size": 0}})
    assert err.value.problems[0].startswith("trainer.eval.batch_size: Input should be greater")


def test_env_vars_that_name_no_setting_are_errors_and_other_promptcot_vars_are_not(monkeypatch):
    from promptcot.settings import unknown_env_settings

    tools = {  # read by the CLI, tests and scripts, not settings
        "PROMPTCOT_CONFIG": "x.yaml",
        "PROMPTCOT_DEBUG": "1",
        "PROMPTCOT_VLLM_PYTHON": "/venv/bin/python",
        "PROMPTCOT_CACHE_DIR": "/tmp",
        "PROMPTCOT_LOG_LEVEL": "INFO",
        "PROMPTCOT_STAGES": "{}",
    }
    assert unknown_env_settings(tools) == []
    assert unknown_env_settings(
        {"PROMPTCOT_SINK_OUTPUT_DIR": "x", "PROMPTCOT_VERIFYY__X": "1"}
    ) == [
        "PROMPTCOT_SINK_OUTPUT_DIR: not a setting; nested keys take two underscores: "
        "PROMPTCOT_SINK__OUTPUT_DIR",
        "verifyy (env PROMPTCOT_VERIFYY__X): unknown key; did you mean verify?",
    ]
    monkeypatch.setenv("PROMPTCOT_METRICS_PORT", "9999")
    with pytest.raises(SettingsError, match="PROMPTCOT_METRICS__PORT"):
        load_settings()


# --- the trainer profiles (trainer/settings.py) ---------------------------------------------------


def test_trainer_profiles_size_the_loop_for_the_machine(monkeypatch):
    cpu = Settings(trainer={"profile": "cpu"})
    gpu = Settings(trainer={"profile": "gpu"})
    # gpu: the paper's rates, full fine-tuning, bf16; cpu: LoRA at LoRA's rates, float32.
    assert (gpu.trainer.cold_start.lr, gpu.trainer.e_step.lr, gpu.trainer.dpo.lr) == (
        2e-5,
        2e-6,
        1e-6,
    )
    assert not gpu.trainer.e_step.use_lora and gpu.trainer.dtype == "bfloat16"
    assert cpu.trainer.e_step.use_lora and cpu.trainer.dtype == "float32"
    assert cpu.trainer.e_step.lr >= 100 * gpu.trainer.e_step.lr
    assert cpu.trainer.e_step.max_seq_len < gpu.trainer.e_step.max_seq_len
    assert cpu.stage("em").batch_within_s < gpu.stage("em").batch_within_s
    # E-step sampling: the paper's K=8 on gpu; fewer, shorter rationales on cpu.
    assert (gpu.rationale.samples, cpu.rationale.samples) == (8, 4)
    # One budget on both: it fits the cold-start rationales (tests/test_budgets.py).
    assert cpu.rationale.max_tokens == gpu.rationale.max_tokens
    assert cpu.trainer.m_step.max_rationale_tokens == cpu.rationale.max_tokens
    assert Settings(trainer={"profile": "cpu"}, rationale={"samples": 6}).rationale.samples == 6
    # auto: gpu only where an NVIDIA device is visible to this process.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Settings().trainer.profile == "cpu"


def test_a_key_set_explicitly_wins_over_the_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMPTCOT_TRAINER__PROFILE", "gpu")
    monkeypatch.setenv("PROMPTCOT_TRAINER__E_STEP__LR", "0.25")
    cfg = tmp_path / "f.yaml"
    cfg.write_text("trainer:\n  dpo: {use_lora: true}\nstages:\n  em: {batch_size: 3}\n")
    s = load_settings(cfg)
    assert s.trainer.profile == "gpu" and s.trainer.e_step.lr == 0.25
    assert s.trainer.m_step.lr == 2e-6 and s.trainer.dpo.use_lora and not s.trainer.e_step.use_lora
    assert s.stage("em").batch_size == 3
    assert s.stage("em").batch_within_s == PROFILE_WINDOWS["gpu"]["em"]["batch_within_s"]
    with pytest.raises(SettingsError) as err:
        Settings(trainer={"profile": "tpu"})
    assert err.value.problems[0].startswith("trainer.profile: Input should be 'auto', 'cpu'")
