"""Host-side isolation of slots (verification/sandbox/isolation.py): one unprivileged uid per slot,
claimed machine-wide with a lock file, parallel slots, and process listing."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import (
        BACKENDS,
        IS_ROOT,
        assert_no_leftovers,
        make_sandbox,
        sandbox_fixture,
    )
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import (
        BACKENDS,
        IS_ROOT,
        assert_no_leftovers,
        make_sandbox,
        sandbox_fixture,
    )

from verification.sandbox import Sandbox, processes_of_uid


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    yield from sandbox_fixture(request.param)


@pytest.mark.skipif(not IS_ROOT, reason="distinct slot uids need root")
def test_runs_as_the_unprivileged_slot_uid(sandbox: Sandbox) -> None:
    result = sandbox.run("import os; print(os.getuid(), os.geteuid())")
    uid, euid = map(int, result.stdout.split())
    assert uid == euid and uid in sandbox.uids and uid != 0


def test_slots_run_in_parallel_with_distinct_uids(sandbox: Sandbox) -> None:
    results = []
    program = "import os, time\ntime.sleep(1.0)\nprint(os.getuid())\n"
    threads = [
        threading.Thread(target=lambda: results.append(sandbox.run(program))) for _ in range(2)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 1.9  # overlapped, not serialized
    uids = {int(r.stdout) for r in results}
    if IS_ROOT:
        assert uids == set(sandbox.uids)
    assert_no_leftovers(sandbox)


@pytest.mark.skipif(not IS_ROOT, reason="distinct slot uids need root")
def test_two_sandboxes_never_share_a_uid_and_close_releases_it() -> None:
    first = make_sandbox("bwrap", slots=1)
    second = make_sandbox("bwrap", slots=1)
    try:
        assert set(first.uids).isdisjoint(second.uids)
    finally:
        second.close()
        first.close()
    lock = Path(first.settings.work_dir) / "uids" / f"{second.uids[0]}.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again after close()
    finally:
        os.close(fd)


def test_processes_of_uid_lists_live_processes_only() -> None:
    assert os.getpid() in processes_of_uid(os.getuid())
    assert processes_of_uid(2**31 - 7) == []
