"""The soak's parts that need no soak (bench/soak.py, bench/soak_check.py): the fault schedule,
and the invariant checks on a hand-built output folder, a clean one and one that breaks every
invariant (real Parquet, LanceDB and checkpoints of the tiny model; no broker, no `up`)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import lancedb
import pyarrow.parquet as pq
import pytest
from factory_harness import factory_settings
from fault_harness import write_config

from bench import soak
from bench.soak_check import check_folder, write_snapshot
from llm.backends import BackendSettings
from streams.records import (
    AnnotatedSeed,
    CandidateProblem,
    ConceptSet,
    DeadLetter,
    ModelUpdate,
    Rationale,
    Verdict,
)
from trainer.checkpoints import CheckpointStore
from workers.stages.sink import problem_from_verdict, problems_table

RSS_LIMIT_MB = 1000.0


# --- the schedule ---------------------------------------------------------------------------------


def test_the_schedule_spreads_every_kind_over_the_run_and_is_replayable():
    plan = soak.schedule(random.Random(5), 12 * 60, 120, 180)
    assert plan == soak.schedule(random.Random(5), 12 * 60, 120, 180)  # the seed replays it
    assert plan != soak.schedule(random.Random(6), 12 * 60, 120, 180)
    assert [f.at for f in plan] == sorted(f.at for f in plan)
    assert all(0 < f.at < 12 * 60 for f in plan)
    faults = [f for f in plan if f.kind != soak.POISON]
    assert {f.kind for f in faults[:4]} == set(soak.FAULTS)  # a rotation: each kind a round
    for before, after in zip(faults, faults[1:]):
        hold = soak.DISK_HOLD_S if before.kind == "full disk" else 0
        assert 60 + hold - 0.2 <= after.at - before.at <= 180 + hold + 0.2
    poison = [f.at for f in plan if f.kind == soak.POISON]
    assert 3 <= len(poison) <= 5  # every 3 minutes, give or take a quarter, over 12
    gaps = [b - a for a, b in zip([0.0, *poison], poison)]
    assert all(135 - 0.2 <= g <= 225 + 0.2 for g in gaps)


def test_without_a_small_disk_the_schedule_has_no_full_disk():
    kinds = tuple(k for k in soak.FAULTS if k != "full disk")
    plan = soak.schedule(random.Random(1), 3600, 120, 300, kinds)
    assert {f.kind for f in plan} == {*kinds, soak.POISON}


# --- the checks -----------------------------------------------------------------------------------


def _full_checkpoint(store: CheckpointStore, role: str, step: str, model: Path, **meta) -> Path:
    def write(tmp: Path) -> None:
        shutil.copytree(model, tmp, dirs_exist_ok=True)

    return store.save(role, step, write, meta).path


def _folder(out: Path, model: Path) -> dict:
    """A soak's folder as the soak leaves it, every invariant holding: two concept sets, one
    verdict each (one accepted: a problem in Parquet, its candidate in LanceDB), a poison batch
    dead-lettered, two checkpoints announced in order, one EM window trained and one too small
    (its seed went round), RSS under the limit, `up` stopped as each fault should."""
    settings = factory_settings(out, "", model, trainer={"checkpoint_dir": str(out / "ckpt")})
    settings.models.annotator = BackendSettings()
    write_config(settings, out / "factory.yaml")
    seed = settings.concepts.seed
    sets = [
        ConceptSet(domain="math", concepts=["c"], difficulty="AMC12", draw=f"{seed}:{k}")
        for k in range(2)
    ]
    cand = CandidateProblem.derived_from(
        sets[0],
        concept_set_id=sets[0].id,
        domain="math",
        difficulty="AMC12",
        concepts=["c"],
        rationale="z",
        problem="x",
    )
    accepted = Verdict.derived_from(
        cand,
        subject_id=cand.id,
        stage="verify",
        accepted=True,
        reason="accepted",
        domain="math",
        pass_rate=0.5,
    )
    rejected = Verdict.derived_from(
        sets[1],
        subject_id=sets[1].id,
        stage="generate",
        accepted=False,
        reason="format",
        domain="math",
    )
    problem = problem_from_verdict(accepted)
    sink = Path(settings.sink.output_dir) / "problems"
    sink.mkdir(parents=True)
    pq.write_table(problems_table([problem]), sink / "part-1.parquet")
    lancedb.connect(settings.vectorstore.store.uri).create_table(
        settings.vectorstore.store.table, data=[{"id": cand.id, "vector": [0.0, 1.0]}]
    )
    ns = settings.kafka.namespace
    letter = DeadLetter(
        stage="generate",
        reason="undecodable",
        error="e",
        source_topic=f"{ns}.concepts",
        partition=0,
        offset=7,
        payload_b64="",
    )
    rationales = [
        Rationale(
            seed_id=f"seed{k}",
            domain="math",
            concepts=["c"],
            problem="x",
            text="z",
            sample_index=0,
            reward=-1.0,
            logp_problem=-0.5,
            logp_rationale=-0.5,
            rationale_model="q",
            prompt_model="p",
        )
        for k in range(2)
    ]
    went_round = AnnotatedSeed(
        seed_id="seed1",
        annotator="em",
        domain="math",
        text="x",
        concepts=["c"],
        rationale="z",
        epoch=1,
    )
    store = CheckpointStore(settings.trainer.checkpoint_dir)
    _full_checkpoint(store, "rationale_model", "cold_start", model)
    _full_checkpoint(store, "rationale_model", "e_step", model, trained_ids=[rationales[0].id])
    _full_checkpoint(store, "prompt_model", "m_step", model, trained_ids=[rationales[0].id])
    updates = [
        ModelUpdate(role=c.role, version=c.version_string, path=str(c.path), step=c.step)
        for role in ("rationale_model", "prompt_model")
        for c in store.list(role)
    ]
    records = {
        "concepts": sets,
        "candidates": [cand],
        "candidates.unique": [cand],
        "verdicts": [accepted, rejected],
        "problems": [problem],
        "pairs": [],
        "deadletter": [letter],
        "models": updates,
        "rationales": rationales,
        "seeds.annotated": [went_round],
    }
    parts = {
        "records": records,
        "committed": {"rationales:0": 2, "pairs:0": 0},
        "faults": [
            {"t": 10.0, "kind": "SIGTERM up", "detail": "running; exit 0"},
            {
                "t": 20.0,
                "kind": "poison",
                "detail": "1 records on concepts",
                "coordinates": [[f"{ns}.concepts", 0, 7]],
                "what": ["concepts: garbage"],
            },
        ],
        "rss": [{"t": 5, "run": 1, "rss_mb": 400.0}, {"t": 10, "run": 1, "rss_mb": 420.0}],
        "settings": settings,
        "store": store,
        "sink": sink,
    }
    _write(out, parts)
    return parts


def _write(out: Path, parts: dict) -> None:
    write_snapshot(
        out / "snapshot",
        {t: [(r, 0, k) for k, r in enumerate(rs)] for t, rs in parts["records"].items()},
        parts["committed"],
    )
    for name, rows in (("faults", parts["faults"]), ("rss", parts["rss"])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_clean_folder_holds_every_invariant(tmp_path, tiny_model_dir):
    _folder(tmp_path, tiny_model_dir)
    checks = check_folder(tmp_path, RSS_LIMIT_MB)
    assert [c.line() for c in checks if not c.ok] == []
    by_name = {c.name: c.counts for c in checks}
    assert by_name["one verdict per concept set"]["one verdict"] == 2
    assert by_name["every checkpoint loadable"] == {"checkpoints": 3, "loaded": 3}
    assert by_name["every poison record dead-lettered"]["dead-lettered"] == 1
    assert by_name["no training window lost or trained twice"]["rationales committed"] == 2


def _another(record, **changes):
    """A record like ``record`` with ``changes``, under the id they give it."""
    return type(record)(**{**record.model_dump(exclude={"id"}), **changes})


def test_a_folder_that_breaks_every_invariant_is_caught(tmp_path, tiny_model_dir):
    parts = _folder(tmp_path, tiny_model_dir)
    records, store = parts["records"], parts["store"]
    settings = parts["settings"]
    # A second verdict for a concept set; a problem written twice to Parquet.
    records["verdicts"].append(_another(records["verdicts"][1], stage="filter"))
    pq.write_table(problems_table(records["problems"]), parts["sink"] / "part-2.parquet")
    # A checkpoint whose weights are cut short; a version never announced; an EM window
    # trained twice; a committed rationale neither trained nor sent round.
    broken = _full_checkpoint(store, "solver", "dpo", tiny_model_dir)
    (broken / "model.safetensors").write_bytes(b"cut short")
    rationale = records["rationales"][0]
    _full_checkpoint(store, "rationale_model", "e_step", tiny_model_dir, trained_ids=[rationale.id])
    records["models"] = [u for u in records["models"] if u.step != "m_step"]
    records["rationales"].append(_another(rationale, seed_id="seed9"))
    parts["committed"]["rationales:0"] = 3
    # RSS over the limit; up exiting 1 after SIGTERM; a poison record no stage dead-lettered.
    parts["rss"].append({"t": 15, "run": 1, "rss_mb": RSS_LIMIT_MB + 1})
    parts["faults"].append({"t": 30.0, "kind": "SIGTERM up", "detail": "", "problem": "exit 1"})
    ns = settings.kafka.namespace
    parts["faults"][1]["coordinates"].append([f"{ns}.verdicts", 1, 3])
    parts["faults"][1]["what"].append("verdicts: 5 MB")
    _write(tmp_path, parts)

    failed = {
        c.name: " ".join(c.violations) for c in check_folder(tmp_path, RSS_LIMIT_MB) if not c.ok
    }
    assert set(failed) == {
        "one verdict per concept set",
        "no problem lost or twice (topic, Parquet, LanceDB)",
        "every checkpoint loadable",
        "versions increasing per role",
        "no training window lost or trained twice",
        "RSS bounded",
        "up stops only as the faults stop it",
        "every poison record dead-lettered",
    }, failed
    assert "1 concept sets with several verdicts" in failed["one verdict per concept set"]
    assert (
        "problem ids twice in the sink"
        in failed["no problem lost or twice (topic, Parquet, LanceDB)"]
    )
    assert "solver/v0001-dpo" in failed["every checkpoint loadable"]
    assert "prompt_model: checkpoints never announced: 1" in failed["versions increasing per role"]
    windows = failed["no training window lost or trained twice"]
    assert "E-step: 1 records trained twice" in windows
    assert "1 committed rationales neither trained nor sent round" in windows
    assert "samples over" in failed["RSS bounded"]
    assert "exit 1" in failed["up stops only as the faults stop it"]
    assert "verdicts" in failed["every poison record dead-lettered"]


@pytest.mark.parametrize("argv", [["--help"]])
def test_the_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        soak.main(argv)
    assert done.value.code == 0 and "--fault-every" in capsys.readouterr().out
