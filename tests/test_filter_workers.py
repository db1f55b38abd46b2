"""The filter stage on real parts: two `promptcot worker filter` processes on one stream let no
near-duplicate through; and the decontamination judge (vectorstore/paraphrase.py,
workers/judge.py) rejects a reworded benchmark problem, passes a near miss, records its verdicts
in lineage, and is never asked twice about a redelivered candidate (the tests at the end).

Both workers are real subprocesses against the embedded broker, with the same namespace, the same
LanceDB folder and the same consumer group. We publish 30 candidates: 10 distinct GSM8K-style
problems, each in three near-identical versions (the original; whitespace changed and a number
reformatted, 1200 vs 1,200; the person renamed), interleaved so the versions of one problem arrive
in different micro-batches. Every candidate gets exactly one outcome, and exactly one version of
each problem is accepted.

Why it holds: the filter's check-then-insert (nearest neighbour in LanceDB, then add) is not
atomic across processes, so two workers deciding concurrently could both accept two versions of
one problem. They never decide concurrently: the `candidates` topic has ONE partition
(streams/topics.py, CANDIDATES.partitions=1), and Kafka gives a partition to one member of a
consumer group at a time. Its owner makes every decision, batch after batch, committing each
accepted batch to the store before the next; the other replica has no partition (a hot standby)
and takes over only if the owner dies or leaves. Outputs are acknowledged before offsets commit,
so a take-over at worst replays a batch, and ids are content hashes: a replay re-accepts the same
id (already in the store) rather than accepting a sibling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from factory_harness import read_records, wait_until
from scripted_backend import ScriptedBackend

from llm.prompts import PARAPHRASE_JUDGE
from llm.roles import Role
from promptcot.settings import Settings
from streams import metrics
from streams.broker import EmbeddedBroker
from streams.clients import publish
from streams.cluster import kafka_python_config
from streams.records import CandidateProblem, Lineage, Verdict
from streams.topics import CANDIDATES, CANDIDATES_UNIQUE, VERDICTS, ensure_topics
from vectorstore.benchmarks import load_benchmarks
from vectorstore.calibrate import load_paraphrase_set
from vectorstore.settings import DecontamSettings
from workers.runtime import run_stages
from workers.stages.filter import FilterStage

pytestmark = pytest.mark.slow

# Shared across runs: the benchmark embeddings are computed once per machine.
CACHE_DIR = Path.home() / ".cache" / "promptcot" / "embeddings"
GROUP_ID = "promptcot-filter"  # consumer_group_prefix + stage: what `promptcot worker filter` joins

# (template, first name, second name, number). GSM8K-style, but written for this test: none is
# in the GSM8K test split or any other benchmark set, so decontamination accepts them.
PROBLEMS = [
    (
        (
            "{name} runs a bakery that sells {n} loaves of bread every week. Each loaf costs "
            "$3 to make "
            "and sells for $5. How much profit does {name} make in four weeks?"
        ),
        "Maria",
        "Keisha",
        1200,
    ),
    (
        (
            "A library had {n} books on its shelves. {name} the librarian donated a quarter "
            "of them to a "
            "school and then bought 150 new ones. How many books does the library have now?"
        ),
        "Tom",
        "Priya",
        2400,
    ),
    (
        (
            "A beekeeper named {name} keeps 6 hives, and each hive gives {n} grams of honey "
            "per season. "
            "{name} fills jars that hold 250 grams each. How many jars can be filled in one season?"
        ),
        "Lena",
        "Fatima",
        1000,
    ),
    (
        (
            "A farmer named {name} plants {n} tomato seeds. Only 80% of the seeds sprout, and "
            "rabbits eat "
            "one tenth of the sprouted plants. How many tomato plants survive?"
        ),
        "Joe",
        "Carlos",
        1500,
    ),
    (
        (
            "{name} drives a delivery truck {n} miles every month. The truck uses one gallon "
            "of fuel per "
            "12 miles and fuel costs $4 per gallon. What does {name} spend on fuel in a month?"
        ),
        "Sam",
        "Omar",
        3600,
    ),
    (
        (
            "A swimming pool holds {n} gallons of water. {name} fills it with a hose that pours 25 "
            "gallons per minute. How many hours does it take to fill the empty pool?"
        ),
        "Rachel",
        "Yuki",
        9000,
    ),
    (
        (
            "{name} bought {n} stickers and shared them equally among 8 friends, keeping 40 for "
            "herself first. How many stickers did each friend get?"
        ),
        "Emma",
        "Sofia",
        1000,
    ),
    (
        (
            "A concert hall has {n} seats. On Friday 85% of the seats were sold at $30 each. "
            "How much "
            "money did {name}, the manager, collect from ticket sales on Friday?"
        ),
        "David",
        "Kwame",
        2000,
    ),
    (
        (
            "{name} reads {n} pages of a novel in 20 days, reading the same number of pages "
            "each day. "
            "At that rate, how many pages will {name} read in the next 6 days?"
        ),
        "Noah",
        "Liam",
        1100,
    ),
    (
        (
            "A factory makes {n} toy cars per day. One in every 50 cars is defective and "
            "thrown away. "
            "{name} packs the good cars in boxes of 12. How many full boxes does {name} pack "
            "each day?"
        ),
        "Grace",
        "Ines",
        4800,
    ),
]
VERSIONS = 3


def _text(template: str, name: str, other: str, n: int, version: int) -> str:
    if version == 0:  # the original
        return template.format(name=name, n=n)
    if version == 1:  # whitespace changed, number reformatted: 1200 -> 1,200
        text = template.format(name=name, n=f"{n:,}")
        return "  " + text.replace(". ", ".\n\n   ").replace(", ", " ,  ", 1) + " \n"
    return template.format(name=other, n=n)  # the person renamed


def candidates() -> list[CandidateProblem]:
    """Version v of every problem, then version v+1 of every problem, ...: interleaved."""
    out = []
    for version in range(VERSIONS):
        for group, (template, name, other, n) in enumerate(PROBLEMS):
            concept_set_id = f"cs-{group}-{version}"
            out.append(
                CandidateProblem(
                    concept_set_id=concept_set_id,
                    generator="test-filter-workers",
                    domain="math",
                    difficulty="GSM8K",
                    concepts=["arithmetic", "percent"],
                    rationale="",
                    problem=_text(template, name, other, n, version),
                    parent_ids=[concept_set_id],
                    lineage=Lineage(concept_set_id=concept_set_id),
                )
            )
    return out


def _group(candidate: CandidateProblem) -> int:
    return int(candidate.concept_set_id.split("-")[1])


def _worker(settings: Settings, store: Path, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PROMPTCOT_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "PROMPTCOT_KAFKA__NAMESPACE": settings.kafka.namespace,
        "PROMPTCOT_METRICS__PORT": "0",
        "PROMPTCOT_VECTORSTORE__STORE__URI": str(store),
        "PROMPTCOT_WORKER__JOURNAL_DIR": str(store.parent / "journal"),
        "PROMPTCOT_VECTORSTORE__DECONTAM__CACHE_DIR": str(CACHE_DIR),
        "PROMPTCOT_VECTORSTORE__EMBEDDER__TORCH_THREADS": "1",
        # Small batches: the versions of one problem meet across batches (the store check), not
        # only inside one batch.
        "PROMPTCOT_STAGES": json.dumps({"filter": {"batch_size": 4, "batch_within_s": 0.3}}),
        "PROMPTCOT_LOG_LEVEL": "INFO",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "promptcot", "worker", "filter"],
        env=env,
        stdout=open(log_path, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


JOINED = f"Joined group '{GROUP_ID}'"
ASSIGNED = "Setting newly assigned partitions"


def _owns_candidates(log_path: Path, settings: Settings) -> bool:
    """Whether the worker's latest partition assignment includes the candidates partition."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if ASSIGNED in line]
    return bool(lines) and f"topic='{CANDIDATES.full_name(settings.kafka.namespace)}'" in lines[-1]


def _outcomes(settings: Settings) -> dict[str, list[tuple[str, str]]]:
    """candidate id -> [(topic, reason)] for every filter outcome seen so far."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r, _ in read_records(settings, "candidates.unique"):
        if r:
            out[r.id].append(("unique", "accepted"))
    for r, _ in read_records(settings, "verdicts"):
        if r and r.stage == "filter":
            out[r.subject_id].append(("verdicts", r.reason))
    return out


@pytest.fixture(scope="module")
def benchmark_cache() -> Path:
    """Embed the benchmark sets once, here, into the cache the workers read: on a fresh machine
    that takes minutes, and the workers should be timed on filtering, not on warming up."""
    from vectorstore.decontam import ContaminationIndex
    from vectorstore.embedder import Embedder
    from vectorstore.settings import DecontamSettings

    ContaminationIndex.from_settings(Embedder(), DecontamSettings(cache_dir=CACHE_DIR))
    return CACHE_DIR


def test_two_filter_workers_let_no_near_duplicate_through(tmp_path, benchmark_cache):
    workers: list[subprocess.Popen] = []
    logs = [tmp_path / f"filter-{i}.log" for i in range(2)]

    def tail() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())

    with EmbeddedBroker() as broker:
        settings = Settings(
            kafka={
                "bootstrap_servers": broker.bootstrap_servers,
                "namespace": f"t{os.urandom(4).hex()}",
            },
            metrics={"port": 0},
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            2,
            1,
        )
        store = tmp_path / "lancedb"
        try:
            workers = [_worker(settings, store, log) for log in logs]
            # Both must be alive and joined to the group (aiokafka logs the join at INFO, after
            # the rebalance that includes the last member) before anything is published.
            deadline = time.monotonic() + 60
            while not all(
                log.exists() and JOINED in log.read_text(errors="replace") for log in logs
            ):
                for w in workers:
                    if w.poll() is not None:
                        pytest.fail(f"a filter worker exited with {w.returncode}:\n{tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"filter workers did not both join the group:\n{tail()}")
                time.sleep(1)
            time.sleep(2)  # let the last rebalance settle
            assert all(w.poll() is None for w in workers), tail()

            cands = candidates()
            publish(settings.kafka, broker.bootstrap_servers, CANDIDATES, cands)
            ids = {c.id for c in cands}
            assert len(ids) == len(cands) == len(PROBLEMS) * VERSIONS

            deadline = time.monotonic() + 180
            while not ids <= set(outcomes := _outcomes(settings)):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{len(ids - set(outcomes))} candidate(s) without an outcome:\n{tail()}"
                    )
                if any(w.poll() is not None for w in workers):
                    pytest.fail(f"a filter worker died mid-stream:\n{tail()}")
                time.sleep(1)
            assert all(w.poll() is None for w in workers), "both replicas stay up throughout"
            # One owner of the single candidates partition, one hot standby.
            owners = [log.name for log in logs if _owns_candidates(log, settings)]
            assert len(owners) == 1, f"candidates partition owned by {owners}:\n{tail()}"
        finally:
            for w in workers:
                if w.poll() is None:
                    os.killpg(w.pid, signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait(timeout=10)

    assert set(outcomes) == ids, "outcomes only for the published candidates"
    assert all(len(o) == 1 for o in outcomes.values()), {
        k: v for k, v in outcomes.items() if len(v) != 1
    }
    accepted_by_group: dict[int, list[str]] = defaultdict(list)
    for c in cands:
        if outcomes[c.id][0][0] == "unique":
            accepted_by_group[_group(c)].append(c.id)
    assert all(len(a) <= 1 for a in accepted_by_group.values()), (
        f"near-duplicates accepted: {dict(accepted_by_group)}"
    )
    assert sorted(accepted_by_group) == list(range(len(PROBLEMS))), (
        f"every problem has one accepted version: {dict(accepted_by_group)}; outcomes: "
        f"{dict(outcomes)}"
    )
    rejections = {reason for o in outcomes.values() for topic, reason in o if topic == "verdicts"}
    assert rejections <= {"near_duplicate", "exact_duplicate"}, rejections


# --- the decontamination judge ------------------------------------------------------------------

SET = {i.id: i for i in load_paraphrase_set()}
BENCHMARK = {b.id: b.text for b in load_benchmarks(DecontamSettings().benchmark_sets)}
# An ordinary candidate: written for this file, like PROBLEMS above.
ORDINARY = PROBLEMS[2][0].format(name="Lena", n=1000)


def _candidate(text: str, key: str) -> CandidateProblem:
    concept_set_id = f"cs-judge-{key}"
    return CandidateProblem(
        concept_set_id=concept_set_id,
        generator="test-filter-judge",
        domain="math",
        difficulty="AIME",
        concepts=["counting"],
        rationale="",
        problem=text,
        parent_ids=[concept_set_id],
        lineage=Lineage(concept_set_id=concept_set_id),
    )


def _judge_settings(tmp_path: Path, kind: str, **kafka: str) -> Settings:
    return Settings(
        kafka=kafka or {},
        metrics={"port": 0},
        worker={"journal_dir": str(tmp_path / "journal")},
        stages={"filter": {"batch_size": 4, "batch_within_s": 0.3}},
        vectorstore={
            "store": {"uri": str(tmp_path / "lancedb")},
            "decontam": {"cache_dir": str(CACHE_DIR), "judge": {"kind": kind}},
        },
    )


def _teacher(same: list, garbage: list = ()) -> ScriptedBackend:
    """A scripted judge model: SAME when asked about a paraphrase (of ``same``) and the item it
    was written from, an unreadable answer about the items in ``garbage``, else DIFFERENT."""
    same_pairs = {(i.text, BENCHMARK[i.source]) for i in same}
    unreadable = {i.text for i in garbage}

    def respond(prompt: str, _: int) -> str:
        question = prompt.split("Problem A:\n", 1)[1]
        candidate, benchmark = question.split("\n\nProblem B:\n", 1)
        benchmark = benchmark.split("\n\nIs Problem A", 1)[0]
        if candidate in unreadable:
            return "Well, it depends on how you read it"
        return " SAME" if (candidate, benchmark) in same_pairs else " DIFFERENT"

    return ScriptedBackend(respond, version="teacher@v1")


def _by_subject(emits) -> dict[str, object]:
    return {
        (e.record.subject_id if isinstance(e.record, Verdict) else e.record.id): e for e in emits
    }


def test_the_filter_rejects_a_paraphrase_passes_a_near_miss_and_keeps_the_verdicts(
    tmp_path, benchmark_cache
):
    """The embedded default (no model): the cheap judge on the real index, store and embedder.
    The paraphrase's nearest item is another problem (gsm8k_test:893); its source comes second,
    so the judge must look past the first neighbour (k = 2)."""
    para, miss = SET["para:gsm8k_test:9"], SET["miss:gsm8k_test:2"]  # 150% -> 120%
    candidates = [_candidate(para.text, "para"), _candidate(miss.text, "miss")]
    stage = FilterStage(_judge_settings(tmp_path, "skeleton"))
    stage.ensure_ready()
    before = metrics.counter_value(metrics.JUDGED_PAIRS, verdict="same")
    out = _by_subject(stage.process(candidates))

    rejected = out[candidates[0].id]
    assert rejected.topic is VERDICTS
    verdict = rejected.record
    assert verdict.reason == "benchmark_paraphrase" and not verdict.accepted
    assert verdict.nearest_id == para.source and verdict.similarity < 0.80
    judgments = verdict.lineage.judgments  # its top-k neighbours, most similar first
    assert [j.other_id for j in judgments if j.same] == [para.source]
    [judgment] = [j for j in judgments if j.same]
    assert judgment.judge == "skeleton@v1" and judgment.stage == "filter"
    assert judgment.similarity == round(verdict.similarity, 4)
    assert "numbers: same" in judgment.detail

    passed = out[candidates[1].id]
    assert passed.topic is CANDIDATES_UNIQUE and passed.record.id == candidates[1].id
    assert passed.record.lineage.judgments, "the near miss's judged pairs travel with it"
    assert not any(j.same for j in passed.record.lineage.judgments)
    assert passed.record.lineage.judgments[0].other_id == miss.source
    assert "new 120" in passed.record.lineage.judgments[0].detail
    assert metrics.counter_value(metrics.JUDGED_PAIRS, verdict="same") == before + 1


def test_the_model_judge_decides_and_an_unreadable_answer_falls_back(tmp_path, benchmark_cache):
    """The judge role on a scripted teacher: it catches a paraphrase whose numbers are too
    common for the cheap signal, passes a near miss that asks another question about the same
    numbers (the cheap signal would reject it), and its unreadable answer leaves the decision to
    the cheap signal, marked and counted."""
    para = SET["para:hmmt25:22"]  # areas 1, 2, 3, 4: too little evidence for the cheap signal
    miss = SET["miss:gsm8k_test:8"]  # same numbers, another question
    garbled = SET["para:gsm8k_test:2"]
    candidates = [_candidate(t.text, t.id) for t in (para, miss, garbled)]
    teacher = _teacher(same=[para], garbage=[garbled])
    stage = FilterStage(_judge_settings(tmp_path, "model"), backends={Role.JUDGE: teacher})
    stage.ensure_ready()
    before = metrics.counter_value(metrics.JUDGED_PAIRS, verdict="malformed")
    out = _by_subject(stage.process(candidates))

    caught = out[candidates[0].id].record
    assert caught.reason == "benchmark_paraphrase" and caught.nearest_id == para.source
    [judgment] = [j for j in caught.lineage.judgments if j.other_id == para.source]
    assert judgment.judge == "teacher@v1" and judgment.template == PARAPHRASE_JUDGE.id
    assert judgment.same and "SAME" in judgment.detail and not judgment.malformed

    assert out[candidates[1].id].topic is CANDIDATES_UNIQUE
    assert not any(j.same for j in out[candidates[1].id].record.lineage.judgments)

    fallback = out[candidates[2].id].record
    assert fallback.reason == "benchmark_paraphrase" and fallback.nearest_id == garbled.source
    marked = [j for j in fallback.lineage.judgments if j.other_id == garbled.source]
    assert marked[0].malformed and "skeleton@v1" in marked[0].detail
    malformed = metrics.counter_value(metrics.JUDGED_PAIRS, verdict="malformed")
    assert malformed == before + len(fallback.lineage.judgments)
    assert len(teacher.prompts) == sum(len(out[c.id].record.lineage.judgments) for c in candidates)


class _RecordingFilter(FilterStage):
    """The filter stage, noting every candidate id it decides."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decided: list[str] = []
        self._lock = threading.Lock()

    def process(self, records):
        with self._lock:
            self.decided += [r.id for r in records]
        return super().process(records)


def test_a_redelivered_candidate_keeps_its_decision_without_a_second_judge_call(
    tmp_path, benchmark_cache
):
    """Through the real broker: the filter with the model judge decides a paraphrase, a near miss
    and an ordinary candidate; the paraphrase is then published again (a redelivery, same id).
    The runtime's journal answers it: the same verdict, and neither the filter nor the judge
    sees it twice."""
    para, miss = SET["para:gsm8k_test:9"], SET["miss:gsm8k_test:9"]
    candidates = [_candidate(para.text, "p"), _candidate(miss.text, "m"), _candidate(ORDINARY, "o")]
    teacher = _teacher(same=[para])

    with EmbeddedBroker() as broker:
        settings = _judge_settings(
            tmp_path,
            "model",
            bootstrap_servers=broker.bootstrap_servers,
            namespace=f"t{os.urandom(4).hex()}",
        )
        ensure_topics(
            kafka_python_config(settings.kafka, broker.bootstrap_servers),
            settings.kafka.namespace,
            2,
            1,
        )
        stage = _RecordingFilter(settings, backends={Role.JUDGE: teacher})
        ids = {c.id for c in candidates}

        def outcomes() -> dict[str, list]:
            found = defaultdict(list)
            for r, _ in read_records(settings, "candidates.unique"):
                if r and r.id in ids:
                    found[r.id].append(r)
            for r, _ in read_records(settings, "verdicts"):
                if r and r.subject_id in ids:
                    found[r.subject_id].append(r)
            return found

        async def until() -> None:
            loop = asyncio.get_running_loop()
            send = publish, settings.kafka, broker.bootstrap_servers, CANDIDATES
            await loop.run_in_executor(None, *send, candidates)
            await wait_until(lambda: set(outcomes()) == ids, timeout_s=180, poll_s=1)
            await loop.run_in_executor(None, *send, candidates[:1])  # the redelivery
            await wait_until(lambda: len(outcomes()[candidates[0].id]) == 2, 120, poll_s=1)

        asyncio.run(
            run_stages(
                settings,
                [stage],
                broker.bootstrap_servers,
                app_id=f"{settings.kafka.namespace}-filter",
                until=until,
            )
        )
        final = outcomes()

    first, again = final[candidates[0].id]
    assert first.reason == "benchmark_paraphrase" and first.nearest_id == para.source
    assert again.model_dump() == first.model_dump(), "the same decision, the same record"
    assert stage.decided.count(candidates[0].id) == 1, "the journal answered the redelivery"
    asked = [p for p in teacher.prompts if para.text in p]
    assert len(asked) == len(first.lineage.judgments) >= 1, "one judge call per pair, once"
    [passed] = final[candidates[1].id]
    assert isinstance(passed, CandidateProblem) and passed.lineage.judgments
    [ordinary] = final[candidates[2].id]
    assert isinstance(ordinary, CandidateProblem), ordinary
