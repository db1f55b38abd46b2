"""`promptcot up` as users and clusters treat it (issue 10, items 4 and 5), with only the sampler
stage (no model needed): a restart continues the sampler's draws from the durable broker; a dead
broker, embedded or configured, stops `up` with one line and a non-zero exit; kill -9 of `up`
leaves no broker or S3 server behind; SIGTERM stops it with exit 0."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.clients import read_all
from streams.settings import KafkaSettings

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PROMPTCOT_EMBEDDED_BROKER__DATA_DIR": str(tmp_path / "broker"),
        "PROMPTCOT_SINK__OUTPUT_DIR": str(tmp_path / "out"),
        "PROMPTCOT_VECTORSTORE__STORE__URI": str(tmp_path / "lancedb"),
        "PROMPTCOT_METRICS__PORT": "0",
        "PROMPTCOT_SAMPLER__MAX_IN_FLIGHT": "5",
        "COLUMNS": "200",
        **extra,
    }


def _up(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "promptcot", "up", "--stages", "sampler", "--seeds", "0", *args],
        env=_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _broker_children(proc: subprocess.Popen) -> tuple[int, int]:
    """(Tansu pid, S3 server pid) of a running `up`, once it has started both."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        kids = {pid: _cmdline(pid) for pid in _children(proc.pid)}
        tansu = [p for p, c in kids.items() if "tansu" in c and " broker " in c]
        s3 = [p for p, c in kids.items() if "localbucket" in c]
        if tansu and s3:
            return tansu[0], s3[0]
        time.sleep(0.2)
    raise AssertionError("up did not start its broker")


def _wait_gone(pids: list[int], timeout_s: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _draws(bootstrap: str) -> list[str]:
    """Draw ids on the concepts topic, in draw order."""
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    draws = [json.loads(m.value)["draw"] for m in read_all(kafka, bootstrap, "promptcot.concepts")]
    return sorted(draws, key=lambda d: int(d.split(":")[1]))


def _stored_draws(tmp_path: Path) -> list[str]:
    """Draw ids kept by the durable broker in tmp_path (none running on it)."""
    with EmbeddedBroker(data_dir=tmp_path / "broker") as broker:
        return _draws(broker.bootstrap_servers)


def _bootstrap_of(tansu: int) -> str:
    url = _cmdline(tansu).split("--listener-url ")[1].split()[0]
    return url.removeprefix("tcp://")


def _wait_draws(bootstrap: str, n: int) -> None:
    """Until the running factory issued ``n`` draws (it is past its start-up)."""
    deadline = time.monotonic() + 60
    while len(_draws(bootstrap)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} draws after 60 s"
        time.sleep(0.5)


def test_restarted_up_continues_the_sampler_from_the_durable_broker(tmp_path):
    first = _up(tmp_path, "--duration", "15s")
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "continued an earlier run" not in out
    assert _stored_draws(tmp_path) == [f"0:{k}" for k in range(5)]

    # With a wider window, stopped by SIGTERM once it issued: 3 new draws, none repeated.
    second = _up(tmp_path, "--duration", "5m", PROMPTCOT_SAMPLER__MAX_IN_FLIGHT="8")
    _wait_draws(_bootstrap_of(_broker_children(second)[0]), 8)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert "continued an earlier run: 5 concept sets issued before (5 still open)" in out
    assert "sampler resumed at draw 5" in out
    assert _stored_draws(tmp_path) == [f"0:{k}" for k in range(8)]


def test_up_exits_with_one_line_when_its_embedded_broker_dies(tmp_path):
    with EmbeddedBroker(data_dir=tmp_path / "broker") as earlier:  # its lines open tansu.log
        earlier_address = earlier.bootstrap_servers
    proc = _up(tmp_path, "--duration", "5m")
    tansu, s3 = _broker_children(proc)
    address = _bootstrap_of(tansu)
    _wait_draws(address, 5)
    os.kill(tansu, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, (out, err)
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: embedded broker exited"), err
    # It quotes this run's log (its own address) and nothing of the earlier run's.
    assert "SIGKILL" in errors[0] and address in errors[0], err
    assert earlier_address not in errors[0], err
    assert earlier_address in (tmp_path / "broker" / "tansu.log").read_text()
    assert _wait_gone([s3]) == []


def test_kill_9_of_up_takes_its_broker_and_s3_server_along(tmp_path):
    proc = _up(tmp_path, "--duration", "5m")
    children = list(_broker_children(proc))
    _wait_draws(_bootstrap_of(children[0]), 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert _wait_gone(children) == []


def test_up_exits_with_one_line_when_its_cluster_is_unreachable(tmp_path):
    broker = EmbeddedBroker().start()
    try:
        proc = _up(
            tmp_path,
            "--duration",
            "5m",
            "--bootstrap",
            broker.bootstrap_servers,
            PROMPTCOT_KAFKA__UNREACHABLE_EXIT_S="4",
            PROMPTCOT_KAFKA__NAMESPACE="unreachable",
        )
        deadline = time.monotonic() + 60
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        while not list(read_all(kafka, broker.bootstrap_servers, "unreachable.concepts")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
    finally:
        broker.stop()
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, (out, err)
    # The clients may log while the cluster has time to come back; then one line, the last.
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cluster at {broker.bootstrap_servers} unreachable for 4 s"], err
    assert err.splitlines()[-1] == errors[0]


def test_ephemeral_up_keeps_nothing(tmp_path):
    proc = _up(tmp_path, "--duration", "8s", "--ephemeral")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "embedded broker (in memory)" in out
    assert not (tmp_path / "broker").exists()


WATCHED_START_UP = """
import sys, time
from promptcot.cli.supervise import Supervisor
from streams.cluster import Cluster
from streams.settings import EmbeddedBrokerSettings, KafkaSettings

cluster = Cluster.connect(KafkaSettings(), EmbeddedBrokerSettings(ephemeral=True))
supervisor = Supervisor(KafkaSettings(), 20, lambda: None)
supervisor.watch(cluster)
print("watching", cluster.broker._proc.pid, flush=True)
time.sleep(300)  # a start-up step that holds the main thread (a cold start), never returning
print("still running", flush=True)
"""


def test_a_broker_that_dies_during_a_start_up_step_stops_up_at_once(tmp_path):
    """`up`'s cold start holds the main thread for minutes before any stage runs: an embedded
    broker dying then must stop it (one line, exit 3) within seconds, not after the step."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED_START_UP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("watching"), (line, proc.stderr.read() if proc.poll() else "")
        os.kill(int(line.split()[1]), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, (out, err)
    assert "still running" not in out
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: embedded broker exited with -9"), err
