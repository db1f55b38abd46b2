"""SFT of the solver on verified traces (the `sft` stage, trainer/traces.py): a window of traces
trains the solver and announces a version on the models topic, held-out problems are never
trained on, and the sft and dpo stages train one solver lineage: each version continues the
other's weights and optimiser, and an SFT version becomes DPO's anchor.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from factory_harness import factory_settings, read_records, wait_until
from trainer_data import fast, pairs, problem, trainer_settings

from streams.records import SolverTrace
from trainer.checkpoints import CheckpointStore
from trainer.heldout import is_heldout

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

LORA = {"use_lora": True, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def traces(n: int, start: int = 0) -> list[SolverTrace]:
    return [
        SolverTrace(
            problem_id=f"prob_{i}",
            source="solver",
            index=0,
            domain="math",
            prompt=problem(i),
            completion=f"We add {i + 2} and {i + 3}.\nThe answer is \\boxed{{{2 * i + 5}}}.",
            reference_answer=str(2 * i + 5),
        )
        for i in range(start, start + n)
    ]


def _steps(**extra: object) -> dict:
    return fast(lr=5e-3, steps_per_window=4, window={"min_records": 2}, **LORA, **extra)


def test_a_traces_window_lowers_the_heldout_trace_nll_and_becomes_the_dpo_anchor(
    tmp_path, tiny_model_dir
):
    from trainer.dpo import DPOTrainerLoop
    from trainer.traces import SolverSFTLoop

    settings = trainer_settings(
        tmp_path, tiny_model_dir, heldout_fraction=0.3, sft=_steps(), dpo=_steps(beta=0.1)
    )
    window = traces(12)
    held = [t for t in window if is_heldout(t.problem_id, 0.3)]
    assert 1 <= len(held) < 10
    sft_loop = SolverSFTLoop(settings.trainer, str(tiny_model_dir))
    (update,) = sft_loop.run_window(window).updates
    m = update.metrics
    assert update.step == "sft" and update.version == "solver/v0001-sft"
    assert m["n_traces"] == len(window) - len(held) and m["n_heldout_traces"] == len(held)
    assert m["heldout_trace_nll_after"] < m["heldout_trace_nll_before"] - 0.1, m
    assert m["optimizer_steps"] == 4 and m["optimizer_step"] == 4
    # Redelivered: not trained twice.
    assert [u.id for u in sft_loop.run_window(window).updates] == [update.id]

    # DPO on the same lineage: its window starts from the SFT version, continues its optimiser
    # (in this process the two loops share the model) and is anchored to it.
    dpo_loop = DPOTrainerLoop(settings.trainer, str(tiny_model_dir))
    assert dpo_loop.solver is sft_loop.solver
    (dpo_update,) = dpo_loop.run_window(pairs(12)).updates
    manifest = json.loads((Path(dpo_update.path) / "checkpoint.json").read_text())
    assert dpo_update.version == "solver/v0002-dpo" and manifest["parent"] == update.version
    assert manifest["anchor"] == {"path": update.path, "version": update.version, "windows": 1}
    assert dpo_update.metrics["optimizer_step"] == 8
    # Anchored to where the window starts: the first step is at the reference point.
    assert dpo_update.metrics["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)


def test_a_trainer_brings_its_model_up_to_a_version_another_process_saved(tmp_path, tiny_model_dir):
    """Another process (here: a lineage of its own, as a process has) saves a newer solver; the
    next window here loads it (weights and optimiser state) instead of training on top of its
    stale copy."""
    from trainer.lineage import RoleLineage
    from trainer.traces import SolverSFTLoop

    settings = trainer_settings(tmp_path, tiny_model_dir, heldout_fraction=0.0, sft=_steps())
    here = SolverSFTLoop(settings.trainer, str(tiny_model_dir))
    stale = here.solver  # loaded at the base
    there = SolverSFTLoop(settings.trainer, str(tiny_model_dir))
    there.lineage = RoleLineage(there.store, "solver")  # a separate process's own
    (v1,) = there.run_window(traces(4)).updates
    (v2,) = here.run_window(traces(4, start=4)).updates
    assert here.solver is not stale
    manifest = json.loads((Path(v2.path) / "checkpoint.json").read_text())
    assert manifest["parent"] == v1.version and v2.metrics["optimizer_step"] == 8
    state = json.loads((Path(v2.path) / "trainer_state.json").read_text())
    assert state["optimizer_steps"] == 8 and (Path(v2.path) / "optimizer.pt").is_file()


@pytest.mark.slow
def test_a_traces_window_trains_the_solver_and_announces_a_version_through_the_broker(
    tmp_path, tiny_model_dir
):
    """The sft and dpo stages on the embedded broker, one window each: two solver versions on
    the models topic, one lineage (the later one's parent is the earlier one), and a backend
    following the models topic serves the SFT version."""
    from types import SimpleNamespace

    from llm import prompts as P
    from llm.backends.base import BackendSettings
    from llm.backends.transformers_backend import TransformersBackend
    from streams.broker import EmbeddedBroker
    from streams.clients import publish
    from streams.cluster import kafka_python_config
    from streams.topics import PAIRS, TRACES, ensure_topics
    from trainer.stages import DPOStage, SolverSFTStage
    from workers.reload import ModelFollower
    from workers.runtime import run_stages

    ckpt = tmp_path / "ckpt"
    window = {"batch_size": 6, "batch_within_s": 2.0}
    with EmbeddedBroker() as broker:
        settings = factory_settings(
            tmp_path,
            broker.bootstrap_servers,
            tiny_model_dir,
            kafka={"partitions": 1},
            stages={"sft": window, "dpo": window},
            trainer={
                "checkpoint_dir": str(ckpt),
                "heldout_fraction": 0.0,
                "sft": _steps(),
                "dpo": _steps(),
            },
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            1,
            1,
        )
        publish(settings.kafka, broker.bootstrap_servers, TRACES, traces(6))
        publish(settings.kafka, broker.bootstrap_servers, PAIRS, pairs(6))

        async def until() -> None:
            await wait_until(lambda: len(read_records(settings, "models", idle_s=0.3)) >= 2, 300)

        stages = [SolverSFTStage(settings), DPOStage(settings)]
        asyncio.run(run_stages(settings, stages, broker.bootstrap_servers, until=until))
        announced = [r for r, _ in read_records(settings, "models")]
    assert sorted(u.step for u in announced) == ["dpo", "sft"]
    assert {u.role for u in announced} == {"solver"}
    first, second = sorted(announced, key=lambda u: u.number)
    assert (first.number, second.number) == (1, 2)
    store = CheckpointStore(ckpt)
    manifest = {c.version: c.metadata for c in store.list("solver")}
    assert manifest[2]["parent"] == first.version  # one lineage, whichever stage went first
    assert second.metrics["optimizer_step"] == first.metrics["optimizer_step"] + 4

    sft_update = next(u for u in announced if u.step == "sft")
    backend = TransformersBackend(BackendSettings(model=str(tiny_model_dir)))
    prompt = P.SOLVER_MATH.render(backend, problem=problem(0))
    target = traces(1)[0].completion
    base_score = backend.score([prompt], [target])[0].total_logprob
    ModelFollower(SimpleNamespace(), backends={"solver": backend}).apply([sft_update])
    assert "+lora:" in backend.model_version
    assert backend.score([prompt], [target])[0].total_logprob > base_score
