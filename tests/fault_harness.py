"""The fault-injection suite's machinery: the durable broker and every stage as their own
processes (`promptcot broker`, `promptcot worker STAGE`, `promptcot up`), poison for every input
topic, and the end-of-run audit of the topics, the Parquet sink and LanceDB.

The audit is what "nothing lost, nothing redone" means (issue 10): every concept set has exactly
one verdict id and every id one outcome; no id twice in the sink or in LanceDB; every accepted
verdict is a problem on the topic and in the sink; every poison record is a dead letter at its
coordinates. Copies of an id on an output topic are redeliveries: counted and printed, allowed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from factory_harness import factory_settings
from kafka import KafkaProducer

from promptcot.settings import Settings
from streams.clients import read_all
from streams.cluster import kafka_python_config
from streams.records import ConceptSet, Record, Verdict
from streams.serde import RecordDecodeError, decode
from streams.topics import CATALOGUE

PIPELINE = ("sampler", "generate", "filter", "verify", "pairs", "traces", "sink")
POISON_BYTES = 5 * 1024 * 1024
# One process per stage on two cores: one torch thread each.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def suite_settings(tmp_path: Path, bootstrap: str, model_dir: Path, n_sets: int) -> Settings:
    """A small factory: ``n_sets`` concept sets, the tiny model, a verify band wide enough that
    some problems are accepted (the product path is exercised)."""
    return factory_settings(
        tmp_path,
        bootstrap,
        model_dir,
        sampler={"max_in_flight": 3, "max_issued": n_sets, "domains": ["math"]},
        verify={"max_pass_rate": 1.0, "math": {"min_agreement": 0.25}},
        embedded_broker={"data_dir": str(tmp_path / "broker")},
        kafka={"unreachable_exit_s": 60},
        worker={"journal_dir": str(tmp_path / "journal")},
    )


def write_config(settings: Settings, path: Path) -> Path:
    data = settings.model_dump(mode="json", exclude={"kafka": {"sasl_password"}})
    path.write_text(yaml.safe_dump(data))
    return path


STARTED: list[Proc] = []  # every process started, for the suite's clean-up


@dataclass
class Proc:
    """One `promptcot ...` child in its own process group, logging to a file."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    starts: int = 0
    metrics_port: int | None = None  # of the running incarnation, when it serves metrics
    consumed: Counter = field(default_factory=Counter)  # stage -> records in, all incarnations

    def start(self, metrics: bool = False) -> Proc:
        self.starts += 1
        self.metrics_port = _free_port() if metrics else None
        if metrics:
            self.env["PROMPTCOT_METRICS__PORT"] = str(self.metrics_port)
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(self.args)}\n".encode())
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "promptcot", *self.args],
                env={**os.environ, **QUIET_ENV, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        STARTED.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def pending(self, stage: str) -> int:
        """Input records the running incarnation holds unfinished (0 if it cannot say)."""
        for line in self._metrics().splitlines():
            if line.startswith(f'promptcot_stage_pending_records{{stage="{stage}"}}'):
                return int(float(line.rsplit(" ", 1)[1]))
        return 0

    def _metrics(self, path: str = "/metrics") -> str:
        if self.metrics_port is None or not self.alive():
            return ""
        import urllib.error
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.metrics_port}{path}"
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except urllib.error.HTTPError as e:  # /readyz answers 503 with its reason
            return e.read().decode()
        except OSError:
            return ""  # not serving yet

    def running(self) -> bool:
        """Past its start-up (its stages run), or not a process that can say (no metrics)."""
        if self.metrics_port is None:
            return True
        answer = self._metrics("/readyz")
        return bool(answer) and not answer.startswith("starting")

    def count_consumed(self) -> None:
        """Add what the running incarnation consumed so far (its records-in counter); called
        just before it is stopped or killed."""
        for line in self._metrics().splitlines():
            if line.startswith("promptcot_records_in_total{"):
                stage = line.split('stage="')[1].split('"')[0]
                self.consumed[stage] += int(float(line.rsplit(" ", 1)[1]))
        self.metrics_port = None

    def kill9(self) -> None:
        """kill -9 of the whole group: the worker and any child it started."""
        self.count_consumed()
        with _no_such_process():
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)

    def sigterm(self, timeout_s: float = 60) -> tuple[int, float]:
        """SIGTERM to the process alone (as a cluster does); (exit code, seconds to exit)."""
        self.count_consumed()
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(
                f"{self.name} ignored SIGTERM for {timeout_s} s:\n{self.tail()}"
            ) from None
        with _no_such_process():
            os.killpg(self.pid, signal.SIGKILL)  # children it left behind, if any
        return code, time.monotonic() - started

    def stop(self) -> None:
        if self.alive():
            with _no_such_process():
                self.sigterm(timeout_s=30)

    def kill_all(self) -> None:
        """Clean-up whatever happened: this process group, gone."""
        if self.popen is not None:
            with _no_such_process():
                os.killpg(self.pid, signal.SIGKILL)
            with _no_such_process():
                self.popen.wait(timeout=30)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class _no_such_process:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        return kind is ProcessLookupError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redeliveries(settings: Settings, workers: dict[str, Proc]) -> dict[str, int]:
    """Per stage: records its workers consumed, over all their incarnations, beyond the
    messages on its input topic: the redelivered ones (a lower bound: a killed incarnation's
    count is read a moment before the kill)."""
    from promptcot.startup import stage_class

    out = {}
    for stage, proc in workers.items():
        topic = stage_class(stage).input.full_name(settings.kafka.namespace)
        kafka = settings.kafka
        on_topic = sum(1 for _ in read_all(kafka, kafka.bootstrap_servers, topic))
        out[stage] = max(0, proc.consumed[stage] - on_topic)
    return out


def broker_proc(tmp_path: Path, config: Path, port: int) -> Proc:
    return Proc(
        "broker", ["broker", "--port", str(port), "--config", str(config)], tmp_path / "broker.log"
    )


def worker_proc(tmp_path: Path, config: Path, stage: str) -> Proc:
    return Proc(stage, ["worker", stage, "--config", str(config)], tmp_path / f"{stage}.log")


def wait_for_broker(settings: Settings, proc: Proc, timeout_s: float = 60) -> None:
    from streams.cluster import ClusterUnreachable, check_reachable

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.alive(), proc.tail()
        try:
            check_reachable(settings.kafka, settings.kafka.bootstrap_servers, timeout_s=2)
            return
        except ClusterUnreachable:
            assert time.monotonic() < deadline, proc.tail()
            time.sleep(0.3)


# --- reading the topics -------------------------------------------------------------------------


def read(settings: Settings, topic: str) -> list[tuple[Record | None, object]]:
    """(record or None, message) for every message of a catalogue topic, read to its end."""
    spec = CATALOGUE[topic]
    out = []
    kafka = settings.kafka
    for message in read_all(kafka, kafka.bootstrap_servers, spec.full_name(kafka.namespace)):
        try:
            out.append((decode(message.value, spec.record), message))
        except RecordDecodeError:
            out.append((None, message))
    return out


def settled(settings: Settings) -> tuple[set[str], set[str]]:
    """(concept set ids the sampler issued, those with a verdict)."""
    own = f"{settings.concepts.seed}:"
    issued = {
        r.id
        for r, _ in read(settings, "concepts")
        if isinstance(r, ConceptSet) and r.draw.startswith(own)
    }
    judged = {
        r.lineage.concept_set_id for r, _ in read(settings, "verdicts") if isinstance(r, Verdict)
    }
    return issued, issued & judged


def product_complete(settings: Settings) -> bool:
    """Every accepted verdict of the run's concept sets is a problem on the topic (the sink ran
    after the verdict); poison has its own audit."""
    issued, _ = settled(settings)
    accepted = {
        r.subject_id
        for r, _ in read(settings, "verdicts")
        if r and r.accepted and r.lineage.concept_set_id in issued
    }
    problems = {r.candidate_id for r, _ in read(settings, "problems") if r}
    return accepted <= problems


def wait_until(check, timeout_s: float, procs: list[Proc], what: str, poll_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail(2500)}" for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(poll_s)


# --- poison ---------------------------------------------------------------------------------------


def poison(settings: Settings, topics: list[str]) -> dict[tuple[str, int, int], str]:
    """Garbage, a record of the wrong schema, an unknown schema_version and a 5 MB record on each
    topic; returns (topic, partition, offset) -> what was sent."""
    kafka = settings.kafka
    producer = KafkaProducer(
        **kafka_python_config(kafka, kafka.bootstrap_servers),
        max_request_size=POISON_BYTES + 1024 * 1024,
    )
    sent: dict[tuple[str, int, int], str] = {}
    for name in topics:
        spec = CATALOGUE[name]
        valid = json.loads(_valid_record(spec.record))
        payloads = {
            "garbage": b"\xff\xfe\x00 not json at all",
            "wrong schema": json.dumps({"schema_version": 1, "no": "such record"}).encode(),
            "unknown schema_version": json.dumps({**valid, "schema_version": 99}).encode(),
            "5 MB": _valid_record(spec.record, pad="x" * POISON_BYTES),
        }
        topic = spec.full_name(kafka.namespace)
        for what, payload in payloads.items():
            meta = producer.send(topic, payload, key=b"poison").get(timeout=60)
            sent[(topic, meta.partition, meta.offset)] = f"{name}: {what}"
    producer.close()
    return sent


def hostile(settings: Settings) -> dict[tuple[str, int, int], tuple[str, str]]:
    """Valid records whose model text is hostile (tests/hostile_text.py: 200 KB of ``\\(``,
    10,000 brackets, power towers, a lone surrogate, a NUL) on each topic a stage reads model
    text from: candidates (filter), candidates.unique (verify), verdicts (pairs, traces, sink).
    Returns (topic, partition, offset) -> (catalogue name, the id its outputs name: the
    candidate's, the verdict's subject). Each must be handled: a verdict, an output or a dead
    letter with the reason (``audit``)."""
    from hostile_text import TEXTS

    from streams.records import CandidateProblem, Rollout

    kafka = settings.kafka
    producer = KafkaProducer(**kafka_python_config(kafka, kafka.bootstrap_servers))
    sent: dict[tuple[str, int, int], tuple[str, str]] = {}
    for name in ("candidates", "candidates.unique", "verdicts"):
        for i, text in enumerate(TEXTS.values()):
            if name == "verdicts":  # accepted against a designer's reference, with a passing
                record = Verdict(  # and a disagreeing rollout: the sink, the pairs and the
                    subject_id=f"hostile_{i}",  # traces stages all have something to do
                    stage="verify",
                    accepted=True,
                    reason="accepted",
                    domain="math",
                    difficulty="AMC12",
                    problem=text,  # JSON doubles backslashes: two copies of 200 KB
                    pass_rate=0.5,  # of \( stay under the record limit
                    reference_answer="7",
                    reference_source="designer",
                    rollouts=[
                        Rollout(text=text, answer="7", passed=True),
                        Rollout(text="\\boxed{8}", answer="8", failure="disagrees"),
                    ],
                )
            else:
                record = CandidateProblem(
                    concept_set_id=f"cset_hostile_{name}_{i}",
                    domain="math",
                    difficulty="AMC12",
                    concepts=["x"],
                    rationale="r",
                    problem=text,
                )
            # json.dumps escapes the lone surrogate as JSON does (\ud800); readers get it back.
            payload = json.dumps(record.model_dump(mode="json")).encode()
            topic = CATALOGUE[name].full_name(kafka.namespace)
            meta = producer.send(topic, payload, key=b"hostile").get(timeout=60)
            subject = record.subject_id if isinstance(record, Verdict) else record.id
            sent[(topic, meta.partition, meta.offset)] = (name, subject)
    producer.close()
    return sent


def _valid_record(record_type: type[Record], pad: str = "") -> bytes:
    """A valid record of the topic's type that names no concept set of the run; ``pad`` makes
    one of its texts that long (a valid record, only too big)."""
    from streams.records import CandidateProblem

    if record_type is ConceptSet:
        record = ConceptSet(
            domain="math", concepts=["x" + pad], difficulty="AMC12", draw="poison:0"
        )
    elif record_type is CandidateProblem:
        record = CandidateProblem(
            concept_set_id="cset_poison",
            domain="math",
            difficulty="AMC12",
            concepts=["x"],
            rationale="r",
            problem="p" + pad,
        )
    else:
        record = Verdict(
            subject_id="poison",
            stage="verify",
            accepted=False,
            reason="x",
            domain="math",
            detail=pad,
        )
    return record.model_dump_json().encode()


def embedded_bootstrap(proc: Proc, timeout_s: float = 90) -> str:
    """The address of the broker a running `promptcot up` started (from its Tansu child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.alive(), proc.tail()
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                except FileNotFoundError:
                    continue
                if b"--listener-url" in cmd:
                    url = cmd[cmd.index(b"--listener-url") + 1].decode()
                    return url.removeprefix("tcp://")
        time.sleep(0.3)
    raise AssertionError(f"up started no broker:\n{proc.tail()}")


# --- the audit ------------------------------------------------------------------------------------

AUDITED = (
    "concepts",
    "candidates",
    "candidates.unique",
    "verdicts",
    "problems",
    "pairs",
    "traces",
)


@dataclass
class Check:
    """One invariant over a run's records: what was counted and the violations found (none:
    it holds). The fault suite asserts it; the soak (bench/soak.py) reports it."""

    name: str
    counts: dict[str, int]
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def line(self) -> str:
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts.items())
        state = "ok" if self.ok else "VIOLATED: " + "; ".join(self.violations)
        return f"{self.name}: {state} ({counts})"


def first_few(items, most: int = 5) -> str:
    """The first ``most`` of ``items`` (sorted if a set), for a violation's text."""
    items = sorted(items) if isinstance(items, (set, frozenset)) else list(items)
    return ", ".join(map(str, items[:most])) + (
        f" (+{len(items) - most} more)" if len(items) > most else ""
    )


def own_draws(records: dict[str, list[Record]], seed: int) -> dict[str, str]:
    """concept set id -> draw, for the sampler's own seed."""
    return {r.id: r.draw for r in records["concepts"] if r.draw.startswith(f"{seed}:")}


def check_verdicts(records: dict[str, list[Record]], seed: int, all_settled: bool = True) -> Check:
    """The sampler issued draws 0..n-1 once each, and every concept set has one verdict id
    (``all_settled``: exactly one; else at most one, the sets without one counted)."""
    draws = own_draws(records, seed)
    numbers = sorted(int(d.split(":")[1]) for d in draws.values())
    verdict_ids: dict[str, set[str]] = defaultdict(set)
    for v in records["verdicts"]:
        verdict_ids[v.lineage.concept_set_id].add(v.id)
    per_set = {cs: len(verdict_ids[cs]) for cs in draws}
    several = {cs: n for cs, n in per_set.items() if n > 1}
    unsettled = {cs for cs, n in per_set.items() if n == 0}
    violations = []
    if numbers != list(range(len(numbers))):
        violations.append(f"draws not 0..{len(numbers) - 1} once each: {first_few(numbers, 12)}")
    if several:
        violations.append(
            f"{len(several)} concept sets with several verdicts: {first_few(several)}"
        )
    if unsettled and all_settled:
        violations.append(
            f"{len(unsettled)} concept sets without a verdict: {first_few(unsettled)}"
        )
    counts = {
        "concept sets": len(draws),
        "one verdict": sum(n == 1 for n in per_set.values()),
        "no verdict": len(unsettled),
        "several verdicts": len(several),
    }
    return Check("one verdict per concept set", counts, violations)


def check_outcomes(records: dict[str, list[Record]]) -> Check:
    """Every id has one outcome on every topic; extra copies are redeliveries (counted)."""
    violations, counts = [], {}
    for topic in AUDITED:
        contents: dict[str, set[str]] = defaultdict(set)
        for r in records[topic]:
            contents[r.id].add(_outcome(r))
        redone = {i for i, o in contents.items() if len(o) > 1}
        if redone:
            violations.append(
                f"{topic}: {len(redone)} ids with several outcomes: {first_few(redone)}"
            )
        counts[f"{topic} redelivered"] = len(records[topic]) - len(contents)
    return Check("one outcome per id", counts, violations)


def check_product(
    settings: Settings, records: dict[str, list[Record]], foreign: frozenset[str] = frozenset()
) -> Check:
    """Every accepted verdict is a problem on the topic and in the sink, once; LanceDB holds
    each unique candidate once, none lost. ``foreign``: candidate ids a test put on the topics
    itself (hostile text), not of the sampler's concept sets."""
    draws = own_draws(records, settings.concepts.seed)
    accepted = {
        v.subject_id
        for v in records["verdicts"]
        if v.accepted and v.lineage.concept_set_id in draws
    }
    problems = {p.candidate_id for p in records["problems"] if p.lineage.concept_set_id in draws}
    rows, lance = sink_ids(settings), lance_ids(settings)
    ours = {c.id for c in records["candidates.unique"] if c.lineage.concept_set_id in draws}
    violations = []
    if problems != accepted:
        violations.append(f"accepted verdicts vs problems differ: {first_few(problems ^ accepted)}")
    twice = [i for i, n in Counter(rows).items() if n > 1]
    if twice:
        violations.append(f"{len(twice)} problem ids twice in the sink: {first_few(twice)}")
    on_topic = {p.id for p in records["problems"]}
    if on_topic != set(rows):
        violations.append(f"problems topic vs sink differ: {first_few(on_topic ^ set(rows))}")
    twice = [i for i, n in Counter(lance).items() if n > 1]
    if twice:
        violations.append(f"{len(twice)} ids twice in LanceDB: {first_few(twice)}")
    if set(lance) - foreign != ours:
        differ = (set(lance) - foreign) ^ ours
        violations.append(f"LanceDB vs unique candidates differ: {first_few(differ)}")
    counts = {
        "accepted": len(accepted),
        "sink rows": len(rows),
        "sink ids twice": len(rows) - len(set(rows)),
        "LanceDB rows": len(lance),
        "LanceDB ids twice": len(lance) - len(set(lance)),
    }
    return Check("no problem lost or twice (topic, Parquet, LanceDB)", counts, violations)


def check_poison(
    records: dict[str, list[Record]], poisoned: dict[tuple[str, int, int], str]
) -> Check:
    """Every poison record is a dead letter at its coordinates."""
    coordinates = {(d.source_topic, d.partition, d.offset) for d in records["deadletter"]}
    missing = {where: what for where, what in poisoned.items() if where not in coordinates}
    violations = [f"poison without a dead letter: {first_few(missing.items())}"] if missing else []
    counts = {"poison records": len(poisoned), "dead-lettered": len(poisoned) - len(missing)}
    return Check("every poison record dead-lettered", counts, violations)


def check_hostile(
    records: dict[str, list[Record]], sent: dict[tuple[str, int, int], tuple[str, str]]
) -> Check:
    """Every hostile record is settled, or dead-lettered, by each stage that reads it."""
    unhandled = _unhandled_hostile(sent, records, records["deadletter"])
    violations = (
        [f"hostile text without a verdict, output or dead letter: {first_few(unhandled.values())}"]
        if unhandled
        else []
    )
    counts = {"hostile records": len(sent), "settled": len(sent) - len(unhandled)}
    return Check("every hostile record settled", counts, violations)


def read_audited(settings: Settings) -> dict[str, list[Record]]:
    """The records the checks read, from the topics (undecodable messages left out)."""
    return {t: [r for r, _ in read(settings, t) if r is not None] for t in (*AUDITED, "deadletter")}


def run_checks(
    settings: Settings,
    records: dict[str, list[Record]],
    poisoned: dict[tuple[str, int, int], str] | None = None,
    all_settled: bool = True,
    hostile_sent: dict[tuple[str, int, int], tuple[str, str]] | None = None,
) -> list[Check]:
    foreign = frozenset(i for name, i in (hostile_sent or {}).values() if name == "candidates")
    checks = [
        check_verdicts(records, settings.concepts.seed, all_settled),
        check_outcomes(records),
        check_product(settings, records, foreign),
        check_poison(records, poisoned or {}),
    ]
    if hostile_sent:
        checks.append(check_hostile(records, hostile_sent))
    return checks


@dataclass
class Audit:
    concept_sets: int
    accepted: int
    redeliveries: dict[str, int]
    dead_letters: int

    def line(self) -> str:
        copies = ", ".join(f"{t} {n}" for t, n in self.redeliveries.items())
        return (
            f"{self.concept_sets} concept sets, {self.accepted} accepted, dead letters "
            f"{self.dead_letters}; redeliveries (extra copies per topic): {copies}"
        )


def audit(
    settings: Settings,
    n_sets: int,
    poisoned: dict[tuple[str, int, int], str] | None = None,
    hostile_sent: dict[tuple[str, int, int], tuple[str, str]] | None = None,
) -> Audit:
    """Assert nothing was lost or redone; return the counts worth printing."""
    records = read_audited(settings)
    checks = run_checks(settings, records, poisoned, hostile_sent=hostile_sent)
    failed = [c.line() for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    verdicts, outcomes, product = checks[:3]
    assert verdicts.counts["concept sets"] == n_sets, verdicts.line()
    return Audit(
        concept_sets=n_sets,
        accepted=product.counts["accepted"],
        redeliveries={t: outcomes.counts[f"{t} redelivered"] for t in AUDITED},
        dead_letters=len({d.id for d in records["deadletter"]}),
    )


def _unhandled_hostile(
    sent: dict[tuple[str, int, int], tuple[str, str]],
    records: dict[str, list[Record]],
    letters: list,
) -> dict[tuple[str, int, int], str]:
    """Hostile records that no stage reading them settled: the filter passes a candidate on or
    rejects it, verify gives a verdict, the sink a problem, the pairs stage a pair and the traces
    stage a trace for an accepted verdict; or the stage dead-letters it at its coordinates (with
    the reason)."""
    dead: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for d in letters:
        dead[(d.source_topic, d.partition, d.offset)].add(d.stage)
    judged = {v.subject_id for v in records["verdicts"]}
    passed_on = {c.id for c in records["candidates.unique"]}
    problems = {p.candidate_id for p in records["problems"]}
    pairs = {p.problem_id for p in records["pairs"]}
    traces = {t.problem_id for t in records["traces"]}
    unhandled = {}
    for where, (name, rid) in sent.items():
        if name == "candidates":
            todo = {"filter": "filter" in dead[where] or rid in passed_on or rid in judged}
        elif name == "candidates.unique":
            todo = {"verify": "verify" in dead[where] or rid in judged}
        else:
            todo = {
                "sink": "sink" in dead[where] or rid in problems,
                "pairs": "pairs" in dead[where] or rid in pairs,
                "traces": "traces" in dead[where] or rid in traces,
            }
        if not all(todo.values()):
            unhandled[where] = (
                f"{name} {rid}: not settled by {[s for s, ok in todo.items() if not ok]}"
            )
    return unhandled


def _outcome(record: Record) -> str:
    """What must not differ between two copies of one id (the decision, not timestamps)."""
    fields = {
        "verdict": ("accepted", "reason", "stage"),
        "candidate": ("problem", "rationale"),
        "problem": ("problem", "pass_rate"),
        "pair": ("chosen", "rejected"),
        "solver_trace": ("prompt", "completion"),
        "concept_set": ("concepts", "difficulty", "draw"),
    }[record.kind]
    return json.dumps({f: getattr(record, f) for f in fields}, sort_keys=True, default=str)


def sink_ids(settings: Settings) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in sorted((Path(settings.sink.output_dir) / "problems").glob("*.parquet")):
        ids += pq.read_table(path, columns=["id"])["id"].to_pylist()
    return ids


def lance_ids(settings: Settings) -> list[str]:
    import lancedb

    store = settings.vectorstore.store
    db = lancedb.connect(store.uri)
    if store.table not in db.table_names():
        return []
    return db.open_table(store.table).to_arrow()["id"].to_pylist()


def fault_points(rng: random.Random, names: list[str]) -> list[tuple[float, str]]:
    """The faults in a random order, each after a random pause (seconds) once the previous one
    is done: points in time while the pipeline works, not at batch boundaries."""
    order = list(names)
    rng.shuffle(order)
    return [(round(rng.uniform(0.5, 4.0), 1), name) for name in order]
