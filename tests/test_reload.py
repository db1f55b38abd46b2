"""Hot reload (workers/reload.py): every process that serves a role follows the models topic."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from factory_harness import factory_settings, read_records, start_worker, wait_for

from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import CandidateProblem, ConceptSet, ModelUpdate, Verdict
from streams.topics import CONCEPTS, MODELS, ensure_topics
from trainer.checkpoints import CheckpointStore
from workers.reload import ModelFollower


class _FakeBackend:
    def __init__(self) -> None:
        self.reloaded: list[str] = []

    def reload(self, path: str) -> None:
        self.reloaded.append(path)


def _update(c) -> ModelUpdate:
    return ModelUpdate(role=c.role, version=c.version_string, path=str(c.path), step=c.step)


def test_follower_moves_matching_roles_to_newer_weights_only(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=5)
    ckpts = [store.save("prompt_model", "m_step", lambda d: None) for _ in range(2)]
    p, solver = _FakeBackend(), _FakeBackend()
    follower = ModelFollower(SimpleNamespace(), backends={"prompt_model": p, "solver": solver})

    assert follower.apply([_update(ckpts[0])]) == ["prompt_model"]
    assert p.reloaded == [str(ckpts[0].path)] and solver.reloaded == []
    follower.apply([_update(ckpts[1]), _update(ckpts[0])])  # newest of a batch wins
    follower.apply([_update(ckpts[0])])  # a redelivered older update is ignored
    assert p.reloaded == [str(ckpts[0].path), str(ckpts[1].path)]
    gone = ModelUpdate(
        role="prompt_model",
        version="prompt_model/v0007-m_step",
        path=str(tmp_path / "pruned"),
        step="m_step",
    )
    follower.apply([gone])  # a pruned folder is not loaded
    assert len(p.reloaded) == 2
    other = store.save("rationale_model", "e_step", lambda d: None)
    assert follower.apply([_update(other)]) == []  # a role this process does not serve


def _worker(settings, model_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        "PROMPTCOT_MODELS__PROMPT_MODEL__MODEL": str(model_dir),
        "PROMPTCOT_WORKER__JOURNAL_DIR": str(log.parent / "journal"),
        "PROMPTCOT_STAGES__GENERATE__BATCH_SIZE": "2",
        "PROMPTCOT_STAGES__GENERATE__BATCH_WITHIN_S": "0.2",
        "PROMPTCOT_GENERATION__MAX_RATIONALE_TOKENS": "32",
        "PROMPTCOT_GENERATION__MAX_PROBLEM_TOKENS": "32",
    }
    argv = [sys.executable, "-m", "promptcot", "worker", "generate"]
    return start_worker(settings, argv, log, env)


def _versions(settings) -> dict[str, str]:
    """concept set id -> the prompt-model version stamped on what settled it."""
    out = {}
    for topic in ("candidates", "verdicts"):
        for r, _ in read_records(settings, topic, idle_s=0.5):
            if isinstance(r, CandidateProblem | Verdict):
                out[r.lineage.concept_set_id] = r.lineage.models.get("prompt_model", "")
    return out


def _sets(prefix: str, n: int) -> list[ConceptSet]:
    return [
        ConceptSet(
            domain="math", concepts=["ratios", "percent"], difficulty="AMC12", draw=f"{prefix}:{i}"
        )
        for i in range(n)
    ]


@pytest.mark.slow
def test_a_generate_worker_in_its_own_process_serves_each_announced_version(
    tmp_path, tiny_model_dir
):
    """The trainer announces a checkpoint on the models topic; a `worker generate` process
    (its own process, its own consumer group) moves to it and stamps it on what it emits."""
    with EmbeddedBroker() as broker:
        settings = factory_settings(tmp_path, broker.bootstrap_servers, tiny_model_dir)
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            2,
            1,
        )
        base = tmp_path / "base"
        shutil.copytree(tiny_model_dir, base)
        log = tmp_path / "worker.log"
        worker = _worker(settings, base, log)

        def served(label: str) -> set[str]:
            """The versions that wrote the candidates of three new concept sets."""
            sets = _sets(label, 3)
            publish(settings.kafka, broker.bootstrap_servers, CONCEPTS, sets)
            wait_for(
                lambda: set(_versions(settings)) >= {s.id for s in sets},
                worker,
                log,
                timeout_s=180,
                poll_s=0.5,
            )
            return {_versions(settings)[s.id] for s in sets}

        try:
            old = served("before")
            assert len(old) == 1 and old.pop().startswith("base@")

            store = CheckpointStore(tmp_path / "ckpt")
            ckpt = store.save(
                "prompt_model", "m_step", lambda d: shutil.copytree(base, d, dirs_exist_ok=True)
            )
            publish(settings.kafka, broker.bootstrap_servers, MODELS, [_update(ckpt)])
            wait_for(
                lambda: "now serves prompt_model/v0001-m_step" in log.read_text(),
                worker,
                log,
                timeout_s=180,
                poll_s=0.5,
            )

            new = served("after")
            assert new == {f"{ckpt.path.name}@" + old_hash(base)}, new
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0


def old_hash(folder: Path) -> str:
    from llm.backends.base import weights_version

    return weights_version(folder).split("@", 1)[1]


def test_a_role_follows_checkpoints_unless_a_server_is_rolled_by_its_deployment(
    tmp_path, tiny_model_dir
):
    from llm.roles import ModelRoles, backend_for, reload_role

    served = ModelRoles(solver={"kind": "openai", "model": "solver"})
    assert not served.solver.follows_checkpoints  # a remote server keeps its served name
    assert not reload_role(served, "solver", str(tiny_model_dir))

    copy = tmp_path / "v0001-dpo"
    shutil.copytree(tiny_model_dir, copy)
    local = ModelRoles(solver={"model": str(tiny_model_dir), "max_model_len": 512})
    backend_for(local, "solver")  # loaded in this process
    assert reload_role(local, "solver", str(copy))
    assert backend_for(local, "solver").model_version.startswith("v0001-dpo@")
    pinned = ModelRoles(solver={"model": str(tiny_model_dir), "follow_checkpoints": False})
    backend_for(pinned, "solver")
    assert not reload_role(pinned, "solver", str(copy))


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_load_is_skipped_and_the_next_one_is_served(
    tmp_path, tiny_model_dir
):
    """A corrupt checkpoint must not end hot reload for the rest of the process's life."""
    import asyncio

    from llm.roles import ModelRoles, backend_for

    solver = backend_for(ModelRoles(solver={"model": str(tiny_model_dir)}), "solver")
    store = CheckpointStore(tmp_path / "ckpt")
    corrupt = store.save("solver", "dpo", lambda d: (d / "config.json").write_text("{not json"))
    good = store.save(
        "solver", "dpo", lambda d: shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
    )
    with EmbeddedBroker() as broker:
        settings = factory_settings(tmp_path, broker.bootstrap_servers, tiny_model_dir)
        kafka = settings.kafka
        ensure_topics(kafka_python_config(kafka, broker.bootstrap_servers), kafka.namespace, 2, 1)
        follower = ModelFollower(settings, broker.bootstrap_servers, backends={"solver": solver})

        async def until(check) -> None:
            for _ in range(600):
                if check():
                    return
                await asyncio.sleep(0.1)
            raise TimeoutError

        async def follow() -> None:
            follower.start()
            try:
                publish(kafka, broker.bootstrap_servers, MODELS, [_update(corrupt)])
                # Tried (and skipped), or the follower died of it.
                await until(lambda: follower.applied.get("solver") or follower._task.done())
                publish(kafka, broker.bootstrap_servers, MODELS, [_update(good)])
                await until(lambda: follower.applied.get("solver") == good.version)
            finally:
                await follower.stop()

        asyncio.run(follow())
    assert solver.model_version.startswith(f"{good.path.name}@")
