"""The soak's invariants (bench/soak.py), checked on its output folder alone, so a run can be
checked again later and a hand-built folder can test the checks (tests/test_soak.py).

The folder holds what the run left: ``factory.yaml`` (the settings `up` ran with; its paths
point into the folder), the Parquet sink, LanceDB and the checkpoints there, ``snapshot/`` (the
topics' records with their coordinates and the factory group's committed offsets, dumped at the
end), ``faults.jsonl`` (every fault and every exit of `up`) and ``rss.jsonl`` (RSS samples).

The checks shared with the fault-injection suite (one verdict per concept set, one outcome per
id, no problem lost or twice in the sink or LanceDB, every poison record dead-lettered) are
tests/fault_harness.py's; the ones below are the soak's own.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # fault_harness lives with the tests (as bench/trainer.py)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fault_harness import AUDITED, Check, first_few, run_checks  # noqa: E402

from streams.records import Record  # noqa: E402
from streams.topics import CATALOGUE  # noqa: E402

SNAPSHOT_TOPICS = (*AUDITED, "deadletter", "models", "rationales", "seeds.annotated")
ROLES = ("rationale_model", "prompt_model", "solver")
FACTORY_GROUP = "promptcot-factory"  # promptcot/cli/factory.py: `up`'s one consumer group


# --- the snapshot ---------------------------------------------------------------------------------


def write_snapshot(
    folder: Path,
    records: dict[str, list[tuple[Record, int, int]]],
    committed: dict[str, int],
) -> None:
    """``records``: topic -> (record, partition, offset); ``committed``: "topic:partition" ->
    the factory group's committed offset (topics by short name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for topic, rows in records.items():
        with open(folder / f"{topic}.jsonl", "w") as f:
            for record, partition, offset in rows:
                f.write(
                    json.dumps(
                        {
                            "partition": partition,
                            "offset": offset,
                            "record": json.loads(record.model_dump_json()),
                        }
                    )
                    + "\n"
                )
    (folder / "committed.json").write_text(json.dumps(committed, indent=1, sort_keys=True))


def read_snapshot(folder: Path) -> tuple[dict[str, list[Any]], dict[str, tuple[int, int]], dict]:
    """(topic -> records in topic order, record id -> (partition, offset) of its first copy,
    committed offsets)."""
    records: dict[str, list[Any]] = {}
    where: dict[str, tuple[int, int]] = {}
    for topic in SNAPSHOT_TOPICS:
        rows = []
        path = folder / f"{topic}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            record = CATALOGUE[topic].record.model_validate(row["record"])
            rows.append((row["partition"], row["offset"], record))
            where.setdefault(f"{topic}/{record.id}", (row["partition"], row["offset"]))
        records[topic] = [r for _, _, r in sorted(rows, key=lambda x: (x[0], x[1]))]
    committed = json.loads((folder / "committed.json").read_text())
    return records, where, committed


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- the soak's own checks ------------------------------------------------------------------------


def check_checkpoints_load(settings: Any) -> Check:
    """Every checkpoint on disk loads as a generator would serve it on reload (a full folder,
    or a LoRA adapter on the base it names)."""
    from llm.backends import BackendSettings
    from llm.backends.pool import new_backend
    from trainer.checkpoints import CheckpointStore

    store = CheckpointStore(settings.trainer.checkpoint_dir)
    loaded, violations = 0, []
    for role in ROLES:
        for ckpt in store.list(role):
            try:
                new_backend(BackendSettings(model=str(ckpt.path))).close()
                loaded += 1
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                violations.append(f"{ckpt.version_string}: {type(e).__name__}: {e}"[:300])
    counts = {"checkpoints": loaded + len(violations), "loaded": loaded}
    return Check("every checkpoint loadable", counts, violations)


def check_versions(settings: Any, records: dict[str, list[Any]]) -> Check:
    """Per role, versions are announced in increasing order (an older one may be announced
    again: a redelivered window), every checkpoint ever written (pruned ones included) was
    announced, and no version number names two checkpoints."""
    from trainer.checkpoints import CheckpointStore

    store = CheckpointStore(settings.trainer.checkpoint_dir)
    violations, counts = [], {}
    for role in ROLES:
        announced = [u for u in records["models"] if u.role == role]
        first_seen: list[int] = []
        for u in announced:
            if u.number not in first_seen:
                first_seen.append(u.number)
        if first_seen != sorted(first_seen):
            violations.append(
                f"{role}: versions announced out of order: {first_few(first_seen, 12)}"
            )
        manifests = store.manifests(role)
        numbers = [m["version"] for m in manifests]
        on_disk = [c.version for c in store.list(role)]
        if len(set(on_disk)) != len(on_disk):
            violations.append(f"{role}: a version number names two checkpoints: {on_disk}")
        created = [m.get("created_at", 0) for m in manifests]
        if created != sorted(created):
            violations.append(f"{role}: versions not increasing with time: {numbers}")
        silent = sorted(set(numbers) - set(first_seen))
        if silent:
            violations.append(f"{role}: checkpoints never announced: {first_few(silent)}")
        counts[f"{role} versions"] = len(numbers)
        counts[f"{role} re-announced"] = len(announced) - len({u.id for u in announced})
    return Check("versions increasing per role", counts, violations)


def _trained(store: Any, role: str, step: str) -> tuple[Counter, int]:
    """(record id -> number of checkpoints of ``role`` at ``step`` trained on it, checkpoints)."""
    manifests = [m for m in store.manifests(role) if m.get("step") == step]
    return Counter(i for m in manifests for i in m.get("trained_ids", [])), len(manifests)


def _committed_below(
    records: list[Any], where: dict[str, tuple[int, int]], topic: str, committed: dict[str, int]
) -> list[Any]:
    """The records of ``topic`` the factory group committed past (its stage is done with)."""
    out = []
    for r in {r.id: r for r in records}.values():
        partition, offset = where[f"{topic}/{r.id}"]
        if offset < committed.get(f"{topic}:{partition}", 0):
            out.append(r)
    return out


def check_windows(
    settings: Any,
    records: dict[str, list[Any]],
    where: dict[str, tuple[int, int]],
    committed: dict[str, int],
) -> Check:
    """No training window trained twice, none lost.

    Twice: a record id among the trained ids of two checkpoints of one role and step. Lost,
    for EM: a rationale the em stage committed that no E-step trained on and whose seed never
    went round to the next epoch (every window the stage processes, trained or too small to
    train, sends its seeds round: trainer/stages.py); and a window its E-step trained that the
    M-step did not. For DPO a window under ``dpo.window.min_records`` trains nothing and leaves
    no trace, so committed pairs not trained on are counted, not judged."""
    from trainer.checkpoints import CheckpointStore
    from trainer.dpo import usable
    from trainer.em import NEXT_EPOCH_ANNOTATOR
    from trainer.heldout import is_heldout

    t = settings.trainer
    store = CheckpointStore(t.checkpoint_dir)
    e_ids, e_n = _trained(store, "rationale_model", "e_step")
    m_ids, m_n = _trained(store, "prompt_model", "m_step")
    d_ids, d_n = _trained(store, "solver", "dpo")
    violations = []
    for what, ids in (("E-step", e_ids), ("M-step", m_ids), ("DPO", d_ids)):
        twice = [i for i, n in ids.items() if n > 1]
        if twice:
            violations.append(f"{what}: {len(twice)} records trained twice: {first_few(twice)}")
    rationales = _committed_below(records["rationales"], where, "rationales", committed)
    went_round = {
        (s.seed_id, s.epoch)
        for s in records["seeds.annotated"]
        if s.annotator == NEXT_EPOCH_ANNOTATOR
    }
    capped = t.max_epochs
    lost = [
        r.id
        for r in rationales
        if r.id not in e_ids
        and (r.seed_id, r.epoch + 1) not in went_round
        and not (capped is not None and r.epoch + 1 >= capped)
    ]
    if lost:
        violations.append(
            f"{len(lost)} committed rationales neither trained nor sent round: {first_few(lost)}"
        )
    if t.m_step.enabled:
        half = sorted(set(e_ids) - set(m_ids))
        if half:
            violations.append(
                f"{len(half)} rationales trained by the E-step, not the M-step: {first_few(half)}"
            )
    pairs = _committed_below(records["pairs"], where, "pairs", committed)
    trainable = [p for p in pairs if usable(p) and not is_heldout(p.problem_id, t.heldout_fraction)]
    counts = {
        "rationales committed": len(rationales),
        "rationales trained (E-step)": len(e_ids),
        "EM windows trained": e_n,
        "M-steps": m_n,
        "pairs committed": len(pairs),
        "pairs trained": len(d_ids),
        "DPO windows trained": d_n,
        "trainable pairs not trained (windows under min_records)": sum(
            p.id not in d_ids for p in trainable
        ),
    }
    return Check("no training window lost or trained twice", counts, violations)


def check_rss(samples: list[dict[str, Any]], limit_mb: float) -> Check:
    """`up`'s RSS (with its children) stayed under ``limit_mb`` in every sample; the growth
    within each run of `up` is counted (median of its last quarter over its first)."""
    by_run: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        by_run[s["run"]].append(s["rss_mb"])
    peak = max((s["rss_mb"] for s in samples), default=0.0)
    over = [s for s in samples if s["rss_mb"] > limit_mb]
    violations = (
        [f"{len(over)} samples over {limit_mb:,.0f} MB (peak {peak:,.0f} MB)"] if over else []
    )
    longest = max(by_run.values(), key=len, default=[])
    quarter = max(1, len(longest) // 4)
    first = sorted(longest[:quarter])[quarter // 2] if longest else 0.0
    last = sorted(longest[-quarter:])[quarter // 2] if longest else 0.0
    counts = {
        "samples": len(samples),
        "peak MB": round(peak),
        "limit MB": round(limit_mb),
        "longest run: first quarter MB": round(first),
        "longest run: last quarter MB": round(last),
    }
    return Check("RSS bounded", counts, violations)


def check_stops(faults: list[dict[str, Any]]) -> Check:
    """`up` stopped only as each fault should stop it: 0 after SIGTERM, 3 after its broker was
    killed, never on its own."""
    violations = [
        f"{f['t']:.0f} s: {f['kind']}: {f['problem']}" for f in faults if f.get("problem")
    ]
    counts = Counter(f["kind"] for f in faults)
    return Check("up stops only as the faults stop it", dict(sorted(counts.items())), violations)


def check_folder(out: Path, rss_limit_mb: float) -> list[Check]:
    """Every invariant of the soak in ``out``."""
    from promptcot.settings import load_settings

    settings = load_settings(out / "factory.yaml")
    records, where, committed = read_snapshot(out / "snapshot")
    faults = read_jsonl(out / "faults.jsonl")
    poisoned = {
        (w[0], w[1], w[2]): what
        for f in faults
        if f["kind"] == "poison"
        for w, what in zip(f.get("coordinates", []), f.get("what", []))
    }
    return [
        *run_checks(settings, records, poisoned),
        check_checkpoints_load(settings),
        check_versions(settings, records),
        check_windows(settings, records, where, committed),
        check_rss(read_jsonl(out / "rss.jsonl"), rss_limit_mb),
        check_stops(faults),
    ]
