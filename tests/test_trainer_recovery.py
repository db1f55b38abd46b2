"""Trainer windows are never lost: a window replayed after a crash finishes what it had not
finished and announces every version it produced; a training error leaves nothing half-done
behind, so the retry trains exactly what a clean run trains.

- In process: E-step done, M-step not (what a crash between the two leaves on disk), then the
  window again: the M-step runs, the E-step is not repeated and its version is announced again.
- In process: a training error (the checkpoint folder cannot be written) raises out of
  ``process`` with nothing recorded; the same window again trains to the same weights as a
  clean run.
- A real ``promptcot worker em`` against the embedded broker, killed with SIGKILL after the
  E-step checkpoint and before the M-step's (held there by the test gate), then restarted: the
  window completes and both versions are on the models topic.
- Through the runtime (its window contract, workers/pipeline.py): a window whose training keeps
  failing (a checkpoint folder that is a file: no retry fixes it) is retried, then every record
  is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from factory_harness import factory_settings, read_records, start_worker, wait_for, wait_until
from gate import gate_env, held
from trainer_data import build_tiny_model, fast, rationales, trainer_settings

from streams.records import ModelUpdate
from streams.topics import MODELS, SEEDS_ANNOTATED
from trainer.checkpoints import CheckpointStore
from trainer.stages import EStepStage

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

SEEDS = ["s1", "s2", "s3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _em_settings(tmp_path: Path, model: Path, **trainer: object):
    base = {
        "heldout_fraction": 0.0,
        "e_step": fast(window={"min_records": 2}),
        "m_step": fast(max_rationale_tokens=16),
    }
    return trainer_settings(tmp_path, model, **{**base, **trainer})


def _models(emits) -> list[ModelUpdate]:
    return [e.record for e in emits if e.topic is MODELS]


def test_a_window_replayed_after_the_e_step_runs_the_m_step_and_announces_both(
    tmp_path, tiny_model
):
    window = rationales(SEEDS)
    # What a crash between the E-step checkpoint and the M-step leaves: the E-step on disk.
    first = _em_settings(tmp_path, tiny_model, m_step=fast(enabled=False))
    (e_update,) = _models(EStepStage(first).process(window))
    assert e_update.step == "e_step"

    # A restarted trainer gets the same window again.
    emits = EStepStage(_em_settings(tmp_path, tiny_model)).process(window)
    updates = _models(emits)
    assert [(u.role, u.step) for u in updates] == [
        ("rationale_model", "e_step"),
        ("prompt_model", "m_step"),
    ]
    assert updates[0].id == e_update.id  # the E-step's version announced again, not retrained
    store = CheckpointStore(tmp_path / "ckpt")
    assert [c.tag for c in store.list("rationale_model")] == ["v0001-e_step"]
    (m_ckpt,) = store.list("prompt_model")
    assert m_ckpt.tag == "v0001-m_step"
    assert sorted(m_ckpt.metadata["trained_ids"]) == sorted(r.id for r in window)
    assert sorted(e.record.seed_id for e in emits if e.topic is SEEDS_ANNOTATED) == SEEDS

    # Part of it again, in a window under min_records: its versions are still announced.
    again = _models(EStepStage(_em_settings(tmp_path, tiny_model)).process(window[:1]))
    assert sorted((u.role, u.id) for u in again) == sorted((u.role, u.id) for u in updates)


def _adapter_or_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (weights,) = list(path.glob("*.safetensors"))
    return load_file(str(weights))


def test_a_training_error_leaves_nothing_behind_and_the_retry_trains_cleanly(tmp_path, tiny_model):
    window = rationales(SEEDS)
    broken = tmp_path / "broken"
    settings = _em_settings(broken, tiny_model)
    blocker = broken / "ckpt" / "rationale_model"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the role's checkpoint folder goes")  # save() fails
    stage = EStepStage(settings)
    with pytest.raises(OSError):
        stage.process(window)  # the error reaches the runtime: it decides to retry
    assert CheckpointStore(broken / "ckpt").latest("prompt_model") is None
    blocker.unlink()  # the cause goes away; the runtime retries the same window
    retried = _models(stage.process(window))
    assert [u.version for u in retried] == [
        "rationale_model/v0001-e_step",
        "prompt_model/v0001-m_step",
    ]
    # The failed attempt trained q_φ in memory before its save failed; the retry started again
    # from the checkpoints, so it trained exactly what a clean run trains.
    clean = _models(EStepStage(_em_settings(tmp_path / "clean", tiny_model)).process(window))
    for got, want in zip(retried, clean):
        a, b = _adapter_or_weights(Path(got.path)), _adapter_or_weights(Path(want.path))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Through the broker


GATED = Path(__file__).with_name("gated_worker.py")


def _worker(settings, model: Path, ckpt: Path, log_path: Path, **gate: str):
    trainer = {
        "checkpoint_dir": str(ckpt),
        "heldout_fraction": 0.0,
        "cold_start": {"on_first_start": False},
        "e_step": fast(window={"min_records": 2}),
        "m_step": fast(max_rationale_tokens=16),
    }
    env = {
        "PROMPTCOT_MODELS__PROMPT_MODEL__MODEL": str(model),
        "PROMPTCOT_MODELS__RATIONALE_MODEL__MODEL": str(model),
        "PROMPTCOT_STAGES": json.dumps({"em": {"batch_size": 9, "batch_within_s": 2.0}}),
        "PROMPTCOT_TRAINER": json.dumps(trainer),
        **gate,
    }
    return start_worker(settings, [sys.executable, str(GATED), "worker", "em"], log_path, env)


@pytest.mark.slow
def test_worker_killed_between_e_and_m_step_completes_the_window_on_restart(tmp_path, tiny_model):
    from streams.broker import EmbeddedBroker
    from streams.clients import publish
    from streams.cluster import kafka_python_config
    from streams.topics import RATIONALES, ensure_topics

    ckpt = tmp_path / "ckpt"
    store = CheckpointStore(ckpt)
    window = rationales(SEEDS)
    with EmbeddedBroker() as broker:
        settings = factory_settings(
            tmp_path, broker.bootstrap_servers, tiny_model, kafka={"partitions": 1}
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            1,
            1,
        )
        publish(settings.kafka, broker.bootstrap_servers, RATIONALES, window)
        log_path = tmp_path / "worker.log"

        # The M-step held at the test gate (tests/gate.py): the kill lands between the E-step's
        # checkpoint and the M-step's on any machine.
        gate = gate_env(tmp_path / "gate", "trainer.em:EMTrainer._m_step")
        first = _worker(settings, tiny_model, ckpt, log_path, **gate)
        wait_for(
            lambda: held(log_path) and store.latest("rationale_model") is not None,
            first,
            log_path,
            240,
            0.05,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        assert store.latest("prompt_model") is None, "the M-step finished before the kill"
        assert read_records(settings, "models", idle_s=0.5) == []  # nothing was announced

        second = _worker(settings, tiny_model, ckpt, log_path)
        try:
            wait_for(
                lambda: len(read_records(settings, "models", idle_s=0.3)) >= 2,
                second,
                log_path,
                240,
                poll_s=1.0,
            )
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=30)

        announced = [r for r, _ in read_records(settings, "models")]
        seeds_again = [r for r, _ in read_records(settings, "seeds.annotated")]
    assert sorted((u.role, u.version) for u in announced) == [
        ("prompt_model", "prompt_model/v0001-m_step"),
        ("rationale_model", "rationale_model/v0001-e_step"),
    ]
    assert [c.tag for c in store.list("rationale_model")] == ["v0001-e_step"]  # not retrained
    (m_ckpt,) = store.list("prompt_model")
    assert sorted(m_ckpt.metadata["trained_ids"]) == sorted(r.id for r in window)
    assert sorted((s.seed_id, s.epoch) for s in seeds_again) == [(s, 1) for s in SEEDS]


@pytest.mark.slow
def test_a_window_whose_training_keeps_failing_is_retried_then_dead_lettered(tmp_path, tiny_model):
    from streams.broker import EmbeddedBroker
    from streams.clients import publish
    from streams.cluster import kafka_python_config
    from streams.topics import RATIONALES, ensure_topics
    from workers.runtime import run_stages

    window = rationales(SEEDS)
    ckpt = tmp_path / "not-a-folder"
    ckpt.write_text("the checkpoint folder is a file: every save fails")
    with EmbeddedBroker() as broker:
        settings = factory_settings(
            tmp_path,
            broker.bootstrap_servers,
            tiny_model,
            kafka={"partitions": 1},
            stages={"em": {"batch_size": 9, "batch_within_s": 2.0}},
            trainer={
                "checkpoint_dir": str(ckpt),
                "heldout_fraction": 0.0,
                "cold_start": {"on_first_start": False},
                "e_step": fast(window={"min_records": 2}),
                "m_step": fast(max_rationale_tokens=16),
            },
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            1,
            1,
        )
        publish(settings.kafka, broker.bootstrap_servers, RATIONALES, window)

        def settled() -> bool:
            dead = read_records(settings, "deadletter", idle_s=0.3)
            return len(dead) >= len(window) or bool(
                read_records(settings, "seeds.annotated", idle_s=0.3)
            )

        async def until() -> None:
            await wait_until(settled, 300)

        asyncio.run(
            run_stages(settings, [EStepStage(settings)], broker.bootstrap_servers, until=until)
        )
        dead = [r for r, _ in read_records(settings, "deadletter")]
        models = read_records(settings, "models")
    assert sorted(d.offset for d in dead) == list(range(len(window)))
    assert all(d.stage == "em" and "Not a directory" in d.error for d in dead)
    assert models == []
