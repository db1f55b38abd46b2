"""The soak: `promptcot up`, training on, for a given time while faults hit it at random; then the
invariants (bench/soak_check.py) on what it left. Not in CI: it runs for hours.

    python -m bench.soak --duration 2h --out bench-out/soak          # the embedded default
    python -m bench.soak --duration 12m --fault-every 2m --poison-every 3m --tiny --out /tmp/s
    python -m bench.soak --check-only bench-out/soak                 # check a folder again

Faults, one at a time, about every --fault-every (uniform between half and one and a half of
it), kinds in a rotation shuffled every round so that a short run sees each kind:

- kill -9 of `up` (the process alone: its broker and S3 server die with it, docs/broker.md);
- SIGTERM of `up` (it must exit 0);
- kill -9 of `up`'s embedded broker (`up` must exit 3 on its own);
- a full disk for a minute: the output folder (Parquet sink, LanceDB, journal, the cold start's
  log) is a tmpfs of --disk-mb mounted for the run (root only; without it this fault is left
  out and the report says why), filled to its last byte, then freed;

and, on its own clock (--poison-every), a poison batch on a random input topic: the fault
suite's set (garbage, a wrong schema, an unknown schema_version, a 5 MB record;
tests/fault_harness.py). `up` is started again after each stop. When the time is up: no more
faults; `up` is restarted with the sampler capped at what it issued and runs until every concept
set has its verdict (--drain at most); the topics are dumped to ``snapshot/`` and checked.

The folder (--out) keeps the evidence: ``factory.yaml``, ``up.log``, ``faults.jsonl``,
``rss.jsonl`` (RSS of `up` and its children every 5 s, from /proc), ``snapshot/``, the
checkpoints, the broker's folder, the output folder, and ``report.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # the fault suite's machinery (as bench/trainer.py does)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fault_harness import (  # noqa: E402
    Proc,
    embedded_bootstrap,
    poison,
    product_complete,
    read,
    settled,
    suite_settings,
    write_config,
)

from bench.soak_check import (  # noqa: E402
    FACTORY_GROUP,
    SNAPSHOT_TOPICS,
    check_folder,
    read_jsonl,
    write_snapshot,
)
from promptcot.registry import STAGES  # noqa: E402
from promptcot.runlog import quiet_progress_bars  # noqa: E402
from streams.topics import CATALOGUE  # noqa: E402

FAULTS = ("kill -9 up", "SIGTERM up", "kill -9 broker", "full disk")
POISON = "poison"
POISONED_TOPICS = ("concepts", "candidates", "candidates.unique", "verdicts")  # as the suite
DISK_HOLD_S = 60.0
RSS_EVERY_S = 5.0


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start, at the earliest (faults run one at a time)
    kind: str


def schedule(
    rng: random.Random,
    duration_s: float,
    every_s: float,
    poison_every_s: float,
    kinds: tuple[str, ...] = FAULTS,
    disk_hold_s: float = DISK_HOLD_S,
) -> list[Fault]:
    """The faults of a run, by time: gaps uniform in [every/2, 3 every/2] (after a full disk,
    counted from its end), kinds from a rotation reshuffled each round (every kind once a
    round); poison on its own clock, every ``poison_every_s`` give or take a quarter."""
    out: list[Fault] = []
    t, rotation = 0.0, []
    while True:
        if not rotation:
            rotation = list(kinds)
            rng.shuffle(rotation)
        kind = rotation.pop()
        t += rng.uniform(0.5 * every_s, 1.5 * every_s)
        if t >= duration_s:
            break
        out.append(Fault(round(t, 1), kind))
        if kind == "full disk":
            t += disk_hold_s
    t = 0.0
    while (t := t + rng.uniform(0.75 * poison_every_s, 1.25 * poison_every_s)) < duration_s:
        out.append(Fault(round(t, 1), POISON))
    return sorted(out, key=lambda f: f.at)


# --- the output folder on a small file system -----------------------------------------------------


def mount_small_disk(folder: Path, size_mb: int) -> str | None:
    """A tmpfs of ``size_mb`` at ``folder``; None if mounted, else why not."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not root: no tmpfs can be mounted, so no full disk"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if done.returncode == 0 else f"mount refused: {done.stderr.strip()}"


def fill(folder: Path) -> int:
    """Fill the file system of ``folder`` to its last byte (one file); bytes written."""
    fd = os.open(folder / ".soak-fill", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def keep_and_unmount(folder: Path) -> None:
    """Copy the tmpfs's files out, unmount it, and put them back in the plain folder."""
    kept = folder.with_name(folder.name + ".kept")
    (folder / ".soak-fill").unlink(missing_ok=True)
    shutil.copytree(folder, kept, symlinks=True)
    subprocess.run(["umount", str(folder)], check=True)
    for child in kept.iterdir():
        shutil.move(str(child), folder / child.name)
    kept.rmdir()


# --- RSS from /proc -------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its descendants (MB)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        todo += children(p)
    return total


def broker_pid(pid: int) -> int | None:
    """The Tansu child of `up` ``pid`` (the one started with --listener-url)."""
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"--listener-url" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    return None


# --- the run --------------------------------------------------------------------------------------


class Soak:
    def __init__(
        self,
        out: Path,
        settings: Any,
        up_args: list[str],
        args: argparse.Namespace,
        rng: random.Random,
    ):
        self.out, self.settings, self.args, self.rng = out, settings, args, rng
        self.up = Proc("up", up_args, out / "up.log")
        # One process for every stage, as a user runs it: torch's threads are not limited to one
        # as for the fault suite's one-process-per-stage workers.
        threads = str(os.cpu_count() or 1)
        self.up.env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        self.disk = Path(settings.sink.output_dir).parent
        self.disk_problem: str | None = None
        self.mounted = False
        self.t0 = time.monotonic()
        self.stop_rss = threading.Event()
        self.grace_s = settings.worker.shutdown_grace_s + 60

    # -- the record of what happened

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, kind: str, detail: str = "", problem: str | None = None, **extra: Any) -> None:
        entry = {"t": round(self.now(), 1), "kind": kind, "detail": detail, **extra}
        if problem:
            entry["problem"] = problem
        with open(self.out / "faults.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        mark = f"  PROBLEM: {problem}" if problem else ""
        print(f"[{entry['t']:7.0f} s] {kind}: {detail}{mark}", flush=True)

    def sample_rss(self) -> None:
        with open(self.out / "rss.jsonl", "a") as f:
            while not self.stop_rss.wait(RSS_EVERY_S):
                if self.up.alive():
                    rss = tree_rss_mb(self.up.pid)
                    f.write(
                        json.dumps({"t": round(self.now()), "run": self.up.starts, "rss_mb": rss})
                    )
                    f.write("\n")
                    f.flush()

    # -- `up`

    def start_up(self) -> None:
        self.up.start(metrics=True)

    def exited(self, timeout_s: float) -> int | None:
        try:
            return self.up.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def watch(self, until: float) -> None:
        """Until ``until`` (seconds after the start): restart `up` whenever it stopped on its
        own, which is a finding."""
        while self.now() < until:
            code = self.up.popen.poll()
            if code is not None:
                self.note("up exited on its own", f"exit {code}", f"exit {code} with no fault")
                self.start_up()
            time.sleep(min(1.0, max(0.0, until - self.now())))

    def bootstrap(self, timeout_s: float = 300) -> str | None:
        """The running `up`'s broker address, once its stages run (None if not in time)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.up.alive():
                return None
            if self.up.running():
                return embedded_bootstrap(self.up)
            time.sleep(1)
        return None

    # -- the faults

    def apply(self, kind: str) -> None:
        {
            "kill -9 up": self.kill_up,
            "SIGTERM up": self.terminate_up,
            "kill -9 broker": self.kill_broker,
            "full disk": self.full_disk,
            POISON: self.poison_topic,
        }[kind]()

    def stop_up(self, kind: str) -> None:
        """SIGTERM: `up` must exit 0 within its grace period (and a minute)."""
        started, t = self.up.running(), time.monotonic()
        self.up.popen.send_signal(signal.SIGTERM)
        code = self.exited(self.grace_s)
        problem = None
        if code is None:
            self.up.kill_all()
            problem = f"ignored SIGTERM for {self.grace_s:.0f} s"
        elif code != 0:
            problem = f"exit {code} after SIGTERM"
        state = "running" if started else "starting"
        self.note(kind, f"{state}; exit {code} after {time.monotonic() - t:.1f} s", problem)

    def kill_up(self) -> None:
        started = self.up.running()
        family = children(self.up.pid)
        os.kill(self.up.pid, signal.SIGKILL)
        code = self.exited(30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{p}").exists() for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in family if Path(f"/proc/{p}").exists()]
        self.note(
            "kill -9 up",
            f"{'running' if started else 'starting'}; exit {code}",
            f"children left behind: {left}" if left else None,
        )
        self.start_up()

    def terminate_up(self) -> None:
        self.stop_up("SIGTERM up")
        self.start_up()

    def kill_broker(self) -> None:
        deadline = time.monotonic() + 60
        while (tansu := broker_pid(self.up.pid)) is None and time.monotonic() < deadline:
            if not self.up.alive():
                break
            time.sleep(0.5)
        if tansu is None:
            self.note("kill -9 broker", "no broker to kill", "up has no broker child")
            return
        t = time.monotonic()
        os.kill(tansu, signal.SIGKILL)
        code = self.exited(90)
        problem = None
        if code is None:
            self.up.kill_all()
            problem = "up still running 90 s after its broker died"
        elif code != 3:
            problem = f"exit {code}, not 3, after its broker died"
        self.note("kill -9 broker", f"up exit {code} after {time.monotonic() - t:.1f} s", problem)
        self.start_up()

    def full_disk(self) -> None:
        if self.disk_problem:
            self.note("full disk", f"skipped: {self.disk_problem}")
            return
        written = fill(self.disk)
        exits = []
        until = time.monotonic() + DISK_HOLD_S
        while time.monotonic() < until:
            if (code := self.up.popen.poll()) is not None:
                exits.append(code)
                self.start_up()
            time.sleep(1)
        (self.disk / ".soak-fill").unlink()
        problem = f"up exited {exits} while the disk was full" if exits else None
        self.note("full disk", f"{written / 1e6:,.1f} MB filler for {DISK_HOLD_S:.0f} s", problem)

    def topics_ready(self, topic: str, timeout_s: float = 120) -> str | None:
        """The running `up`'s broker address once ``topic`` exists there (`up` creates its
        topics before its cold start: poison may wait on a topic while models load)."""
        from kafka import KafkaAdminClient

        from streams.cluster import kafka_python_config

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.up.alive():
            with contextlib.suppress(Exception):  # the broker may be starting
                where = embedded_bootstrap(self.up, timeout_s=max(1, deadline - time.monotonic()))
                admin = KafkaAdminClient(**kafka_python_config(self.settings.kafka, where))
                try:
                    if topic in admin.list_topics():
                        return where
                finally:
                    admin.close()
            time.sleep(1)
        return None

    def poison_topic(self) -> None:
        topic = self.rng.choice(POISONED_TOPICS)
        where = self.topics_ready(CATALOGUE[topic].full_name(self.settings.kafka.namespace))
        if where is None:
            self.note(POISON, f"skipped: no topic {topic} within 2 minutes")
            return
        sent = poison(self._at(where), [topic])
        self.note(
            POISON,
            f"{len(sent)} records on {topic}",
            coordinates=[list(c) for c in sent],
            what=list(sent.values()),
        )

    # -- the end

    def drain(self) -> None:
        """No more faults: `up` again with the sampler capped at what it issued, until every
        concept set has its verdict and every accepted one is in the sink (--drain at most).
        Without annotate and rationale: the seeds' EM epochs would go on for ever and hold the
        CPU; em and dpo still run, to finish (and announce) the windows on their topics."""
        where = self.bootstrap()
        # a cap at or under what the sampler issued stops it (it restores its count from the
        # topics); 0 if `up` is not running now
        issued = len(settled(self._at(where))[0]) if where else 0
        self.up.env["PROMPTCOT_SAMPLER__MAX_ISSUED"] = str(issued)
        self.stop_up("stop for the drain")
        stages = [s for s in STAGES if s not in ("annotate", "rationale")]
        seeds = self.up.args.index("--seeds")
        self.up.args[seeds : seeds + 2] = ["--seeds", "0", "--stages", ",".join(stages)]
        self.start_up()
        deadline = self.now() + self.args.drain
        done = False
        while self.now() < deadline and not done:
            self.watch(self.now() + 10)
            where = self.bootstrap(timeout_s=max(1, deadline - self.now()))
            if where is not None:
                issued_ids, judged = settled(self._at(where))
                done = judged == issued_ids and product_complete(self._at(where))
        self.note(
            "drained" if done else "drain timed out",
            f"{issued} concept sets issued",
            None if done else f"not every concept set settled within {self.args.drain:.0f} s",
        )
        self.stop_up("final stop")

    def _at(self, bootstrap: str) -> Any:
        self.settings.kafka.bootstrap_servers = bootstrap
        return self.settings

    def snapshot(self) -> None:
        from promptcot.carryover import committed_offsets
        from streams.broker import EmbeddedBroker

        ns = self.settings.kafka.namespace
        with EmbeddedBroker(data_dir=self.settings.embedded_broker.data_dir) as broker:
            settings = self._at(broker.bootstrap_servers)
            records = {
                topic: [(r, m.partition, m.offset) for r, m in read(settings, topic) if r]
                for topic in SNAPSHOT_TOPICS
            }
            committed = committed_offsets(settings, broker.bootstrap_servers, FACTORY_GROUP)
        short = {k.removeprefix(f"{ns}."): v for k, v in committed.items()}
        write_snapshot(self.out / "snapshot", records, short)

    def run(self) -> None:
        kinds = FAULTS
        self.disk_problem = mount_small_disk(self.disk, self.args.disk_mb)
        self.mounted = self.disk_problem is None
        if self.disk_problem:
            kinds = tuple(k for k in FAULTS if k != "full disk")
            print(f"full disk left out: {self.disk_problem}", flush=True)
        plan = schedule(
            self.rng, self.args.duration, self.args.fault_every, self.args.poison_every, kinds
        )
        print(f"{len(plan)} faults planned: " + ", ".join(f"{f.at:.0f} s {f.kind}" for f in plan))
        rss = threading.Thread(target=self.sample_rss, daemon=True)
        try:
            self.start_up()
            rss.start()
            for fault in plan:
                self.watch(fault.at)
                self.apply(fault.kind)
            self.watch(self.args.duration)
            self.drain()
        finally:
            self.stop_rss.set()
            if self.up.alive():
                self.up.kill_all()
        self.snapshot()


# --- the command ----------------------------------------------------------------------------------


def soak_settings(out: Path, tiny_model: Path | None) -> Any:
    """`up`'s settings: the embedded default (or the tiny test model in every role, no teacher),
    every state folder under ``out``, the output folder (sink, LanceDB, journal) under
    ``out/disk`` (the small file system), every checkpoint kept."""
    from bench.loop import bench_settings
    from llm.backends import BackendSettings

    if tiny_model is not None:
        settings = suite_settings(out, "", tiny_model, 0)
        settings.sampler.max_issued = None
        settings.models.annotator = BackendSettings()  # annotated from the seeds themselves
    else:
        settings = bench_settings(out, "promptcot")
    disk = out / "disk"
    settings.kafka.bootstrap_servers = None  # up starts its durable embedded broker
    settings.embedded_broker.data_dir = out / "broker"
    settings.sink.output_dir = disk / "output"
    settings.vectorstore.store.uri = str(disk / "lancedb")
    settings.worker.journal_dir = disk / "journal"
    settings.trainer.checkpoint_dir = out / "checkpoints"
    settings.trainer.keep_last = 10_000  # every version stays, so every one is load-checked
    settings.metrics.port = 0
    return settings


def report(out: Path, checks: list[Any], meta: dict[str, Any]) -> bool:
    faults = read_jsonl(out / "faults.jsonl")
    ok = all(c.ok for c in checks)
    print("\ninvariants:")
    for c in checks:
        print(f"  {c.line()}")
    (out / "report.json").write_text(
        json.dumps(
            {
                **meta,
                "ok": ok,
                "faults": faults,
                "invariants": [
                    {"name": c.name, "ok": c.ok, "counts": c.counts, "violations": c.violations}
                    for c in checks
                ],
            },
            indent=2,
            default=str,
        )
    )
    print(
        f"{'all invariants hold' if ok else 'INVARIANTS VIOLATED'}; report: {out / 'report.json'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    from promptcot.cli.app import parse_duration

    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", default="2h", help="time under faults (e.g. 2h, 12m)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/soak"), help="the run's folder")
    ap.add_argument("--fault-every", default="10m", help="mean time between faults")
    ap.add_argument("--poison-every", default="5m", help="mean time between poison batches")
    ap.add_argument("--drain", default="30m", help="most time to let every concept set settle")
    ap.add_argument("--disk-mb", type=int, default=256, help="size of the output folder's tmpfs")
    ap.add_argument("--seeds", type=int, default=None, help="up --seeds (128; 16 with --tiny)")
    ap.add_argument("--seed", type=int, default=None, help="the random seed (printed)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model in every role")
    ap.add_argument("--max-rss-gb", type=float, default=None, help="RSS bound (20; 6 with --tiny)")
    ap.add_argument("--check-only", type=Path, metavar="DIR", help="check a finished run's folder")
    args = ap.parse_args(argv)
    quiet_progress_bars()  # the checkpoint loads of the checks would print theirs
    rss_limit_mb = 1024 * (args.max_rss_gb or (6.0 if args.tiny else 20.0))
    if args.check_only:
        return 0 if report(args.check_only, check_folder(args.check_only, rss_limit_mb), {}) else 1

    for name in ("duration", "fault_every", "poison_every", "drain"):
        setattr(args, name, parse_duration(getattr(args, name)))
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"soak seed {seed} (--seed {seed} replays the schedule)", flush=True)
    out = args.out.resolve()
    if (out / "faults.jsonl").exists():
        raise SystemExit(f"error: {out} holds a run already: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tiny = None
    if args.tiny:
        from tiny_model import tiny_model_dir

        tiny = tiny_model_dir()
    settings = soak_settings(out, tiny)
    config = write_config(settings, out / "factory.yaml")
    seeds = args.seeds if args.seeds is not None else (16 if args.tiny else 128)
    up_args = ["up", "--config", str(config), "--max-problems", "1000000000"]
    up_args += ["--duration", "1000h", "--seeds", str(seeds)]  # the soak stops it
    soak = Soak(out, settings, up_args, args, random.Random(seed))
    started = time.time()
    try:
        soak.run()
        checks = check_folder(out, rss_limit_mb)
    finally:
        if soak.mounted:
            keep_and_unmount(soak.disk)
    meta = {
        "seed": seed,
        "duration_s": args.duration,
        "fault_every_s": args.fault_every,
        "poison_every_s": args.poison_every,
        "tiny": args.tiny,
        "wall_s": round(time.time() - started),
        "full_disk": soak.disk_problem or f"tmpfs of {args.disk_mb} MB",
    }
    return 0 if report(out, checks, meta) else 1


if __name__ == "__main__":
    sys.exit(main())
