"""`promptcot worker` as users run it: a separate process against a bootstrap address. Killed
with SIGKILL mid-stream and restarted, it loses nothing (at-least-once) and emits no second
candidate for any concept set (ids name the unit of work, so a redelivery repeats an id).

"Mid-stream" is held, not hoped for: the first worker runs behind the test gate
(tests/gate.py), which lets its first micro-batch through and holds the second until the kill;
a fast machine used to finish all 40 first (issue 21)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from factory_harness import factory_settings, read_records, start_worker, wait_for
from gate import gate_env, held

from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import ConceptSet
from streams.topics import CONCEPTS, ensure_topics

pytestmark = pytest.mark.slow
N_SETS = 40


BATCH = 2
GATED = Path(__file__).with_name("gated_worker.py")


def _worker(settings, model_dir, log_path, **gate: str) -> subprocess.Popen:
    env = {
        "PROMPTCOT_MODELS__PROMPT_MODEL__MODEL": str(model_dir),
        "PROMPTCOT_WORKER__JOURNAL_DIR": str(log_path.parent / "journal"),
        "PROMPTCOT_STAGES": json.dumps({"generate": {"batch_size": BATCH, "batch_within_s": 0.2}}),
        "PROMPTCOT_GENERATION__MAX_RATIONALE_TOKENS": "64",
        "PROMPTCOT_GENERATION__MAX_PROBLEM_TOKENS": "64",
        **gate,
    }
    argv = [sys.executable, str(GATED), "worker", "generate"]
    return start_worker(settings, argv, log_path, env)


def _fates(settings) -> dict[str, set[str]]:
    """concept set id -> ids of the records that settled it (candidates or rejections)."""
    out: dict[str, set[str]] = defaultdict(set)
    for r, _ in read_records(settings, "candidates"):
        if r:
            out[r.concept_set_id].add(r.id)
    for r, _ in read_records(settings, "verdicts"):
        if r and r.stage == "generate":
            out[r.subject_id].add(r.id)
    return out


def _candidates_written(settings) -> int:
    """A quick count (short idle wait) of what the worker wrote."""
    from streams.clients import read_raw

    topic = f"{settings.kafka.namespace}.candidates"
    return sum(
        1 for _ in read_raw(settings.kafka, settings.kafka.bootstrap_servers, topic, idle_s=0.2)
    )


def test_worker_killed_mid_stream_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir):
    with EmbeddedBroker() as broker:
        settings = factory_settings(tmp_path, broker.bootstrap_servers, tiny_model_dir)
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            2,
            1,
        )
        sets = [
            ConceptSet(
                domain="math", concepts=["ratios", "percent"], difficulty="AMC12", draw=f"t:{i}"
            )
            for i in range(N_SETS)
        ]
        publish(settings.kafka, broker.bootstrap_servers, CONCEPTS, sets)
        log_path = tmp_path / "worker.log"

        # Its first micro-batch goes through; the second waits at the gate, never opened.
        gate = gate_env(tmp_path / "gate", "workers.stages.generate:GenerateStage.process", 1)
        first = _worker(settings, tiny_model_dir, log_path, **gate)
        wait_for(
            lambda: held(log_path) and _candidates_written(settings) >= 1,
            first,
            log_path,
            180,
            poll_s=0.2,
        )
        os.killpg(first.pid, signal.SIGKILL)  # no commit, no goodbye to the group
        first.wait(timeout=10)
        settled_before = len(_fates(settings))
        assert 1 <= settled_before <= BATCH  # one micro-batch settled, on any machine

        second = _worker(settings, tiny_model_dir, log_path)
        try:
            wait_for(lambda: len(_fates(settings)) == N_SETS, second, log_path, 420, poll_s=0.2)
        finally:
            os.killpg(second.pid, signal.SIGTERM)
            second.wait(timeout=30)

        fates = _fates(settings)
        assert set(fates) == {s.id for s in sets}  # nothing lost
        assert all(len(ids) == 1 for ids in fates.values()), fates  # nothing emitted twice
