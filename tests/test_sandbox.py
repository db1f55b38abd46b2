"""Security tests of workers/sandbox.py with real bwrap / unshare and real processes.

Every containment test also asserts that no live process of the slot uids remains afterwards.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.sandbox import (
    Limits,
    Sandbox,
    SandboxSettings,
    SandboxUnavailable,
    TestCase,
    processes_of_uid,
)

IS_ROOT = os.geteuid() == 0
FAST = Limits(
    cpu_seconds=1,
    wall_seconds=2,
    memory_mb=256,
    max_processes=8,
    max_file_mb=8,
    max_output_bytes=1 << 20,
)


@pytest.fixture(scope="module", params=["bwrap", "unshare"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    sb = Sandbox(SandboxSettings(backend=request.param, slots=2, limits=FAST))
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def bwrap_box() -> Iterator[Sandbox]:
    sb = Sandbox(SandboxSettings(backend="bwrap", slots=2, limits=FAST))
    yield sb
    sb.close()


def assert_no_leftovers(sb: Sandbox) -> None:
    if not IS_ROOT:
        return  # shared uid: the caller's own processes would match
    for uid in sb.uids:
        assert processes_of_uid(uid) == [], f"processes of sandbox uid {uid} remain"


def test_backend_is_the_one_asked_for(sandbox: Sandbox) -> None:
    result = sandbox.run("print(input()[::-1])", b"abc")
    assert result.stdout == b"cba\n"
    assert result.exit_code == 0
    assert result.backend == sandbox.backend
    assert_no_leftovers(sandbox)


@pytest.mark.skipif(not IS_ROOT, reason="distinct slot uids need root")
def test_runs_as_the_unprivileged_slot_uid(sandbox: Sandbox) -> None:
    result = sandbox.run("import os; print(os.getuid(), os.geteuid())")
    uid, euid = map(int, result.stdout.split())
    assert uid == euid and uid in sandbox.uids and uid != 0


def test_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    bomb = (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    start = time.monotonic()
    result = sandbox.run(bomb, limits=FAST)
    assert time.monotonic() - start < FAST.wall_seconds + 3
    assert result.timed_out or result.killed is not None
    assert_no_leftovers(sandbox)


def test_fork_count_is_capped(sandbox: Sandbox) -> None:
    counter = (
        "import os, time\nn = 0\nwhile n < 10000:\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
        "        os._exit(0)\n    n += 1\nprint(n, flush=True)\n"
    )
    result = sandbox.run(counter, limits=FAST)
    forks = int(result.stdout)
    assert 0 < forks <= FAST.max_processes + 8  # + the sandbox's own processes
    assert_no_leftovers(sandbox)


def test_infinite_loop_hits_the_cpu_limit(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "while True:\n    pass\n", limits=FAST.model_copy(update={"wall_seconds": 5})
    )
    assert result.killed is not None  # SIGXCPU, then SIGKILL at the hard limit
    assert result.wall_time < 4
    assert_no_leftovers(sandbox)


def test_sleeping_loop_hits_the_wall_limit(sandbox: Sandbox) -> None:
    result = sandbox.run("import time\nwhile True:\n    time.sleep(0.1)\n")
    assert result.timed_out
    assert FAST.wall_seconds <= result.wall_time < FAST.wall_seconds + 2
    assert_no_leftovers(sandbox)


def test_4gb_allocation_fails(sandbox: Sandbox) -> None:
    result = sandbox.run("x = bytearray(4 * 1024 ** 3)\nprint('allocated')\n")
    assert b"allocated" not in result.stdout
    assert b"MemoryError" in result.stderr
    assert_no_leftovers(sandbox)


def test_cannot_write_etc_or_home(sandbox: Sandbox, tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    home = Path(os.path.expanduser("~"))
    targets = [Path("/etc") / f"promptcot-{token}", home / f"promptcot-{token}"]
    program = (
        f"targets = {[str(t) for t in targets]!r}\n"
        "for t in targets:\n"
        "    try:\n        open(t, 'w').write('pwned')\n        print('wrote', t)\n"
        "    except OSError as exc:\n        print('denied', type(exc).__name__)\n"
    )
    result = sandbox.run(program)
    assert result.stdout.count(b"denied") == 2, result.stdout
    for target in targets:
        assert not target.exists()
    assert_no_leftovers(sandbox)


def test_100mb_file_is_cut_at_the_file_limit(sandbox: Sandbox) -> None:
    program = (
        "import os\nchunk = b'x' * (1 << 20)\nwritten = 0\n"
        "try:\n    with open('big', 'wb') as f:\n        for _ in range(100):\n"
        "            f.write(chunk)\n            f.flush()\n            written += len(chunk)\n"
        "except OSError as exc:\n    print('stopped', type(exc).__name__)\n"
        "print(written, os.path.getsize('big'))\n"
    )
    result = sandbox.run(program)
    assert b"stopped" in result.stdout, result.stderr
    written, size = map(int, result.stdout.split()[-2:])
    assert size <= FAST.max_file_mb * 1024 * 1024
    assert written < 100 * (1 << 20)
    assert_no_leftovers(sandbox)


def test_no_connection_to_host_loopback(sandbox: Sandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    program = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
        "    print('connected')\nexcept OSError as exc:\n    print('blocked', exc)\n"
    )
    try:
        result = sandbox.run(program)
        assert result.stdout.startswith(b"blocked"), result.stdout
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
    assert_no_leftovers(sandbox)


def test_no_connection_to_outside_address(sandbox: Sandbox) -> None:
    program = (
        "import socket\nfor addr in [('1.1.1.1', 53), ('8.8.8.8', 443)]:\n    try:\n"
        "        socket.create_connection(addr, timeout=1)\n        print('connected')\n"
        "    except OSError as exc:\n        print('blocked', exc.errno)\n"
    )
    result = sandbox.run(program)
    assert result.stdout.count(b"blocked") == 2, result.stdout
    assert_no_leftovers(sandbox)


def test_parent_environment_is_invisible(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" + secrets.token_hex(12)
    monkeypatch.setenv("PROMPTCOT_TEST_SECRET", secret)
    program = (
        "import os\nprint(dict(os.environ))\n"
        f"for pid in ['self', '1', '{os.getpid()}', '{os.getppid()}']:\n"
        "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as exc:\n        print('denied', pid, exc)\n"
    )
    result = sandbox.run(program)
    assert result.exit_code == 0
    assert secret.encode() not in result.stdout + result.stderr
    assert b"PROMPTCOT_TEST_SECRET" not in result.stdout
    assert_no_leftovers(sandbox)


def test_killing_its_parent_is_contained(sandbox: Sandbox) -> None:
    program = (
        "import os\nfor pid in (os.getppid(), 1):\n    try:\n        os.kill(pid, 9)\n"
        "    except OSError as exc:\n        print('denied', exc)\nprint('alive')\n"
    )
    result = sandbox.run(program)
    assert result.wall_time < 5
    assert os.getpid() > 0  # the host process is unaffected (we are still here)
    # in run_tests the parent is the harness: losing it must fail the tests, never pass them
    outcomes = sandbox.run_tests(program + "print(1)\n", [(b"", b"alive\n1\n")] * 2)
    assert all(o.passed for o in outcomes) or not any(o.passed for o in outcomes)
    assert_no_leftovers(sandbox)


def test_background_process_is_killed(sandbox: Sandbox) -> None:
    program = (
        "import subprocess\n"
        "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
        "subprocess.Popen(['sh', '-c', 'while :; do :; done'], start_new_session=True,"
        " stdout=subprocess.DEVNULL)\nprint('left them')\n"
    )
    result = sandbox.run(program)
    assert result.stdout == b"left them\n"
    assert result.wall_time < FAST.wall_seconds  # did not wait for the children
    outcomes = sandbox.run_tests(program, [(b"", b"left them")] * 2)
    assert [o.passed for o in outcomes] == [True, True]
    assert all(o.wall_time < 1.5 for o in outcomes)
    assert_no_leftovers(sandbox)


def test_huge_stdout_is_truncated(sandbox: Sandbox) -> None:
    program = "import sys\nwhile True:\n    sys.stdout.buffer.write(b'x' * 65536)\n"
    limits = FAST.model_copy(update={"max_output_bytes": 1 << 20})
    result = sandbox.run(program, limits=limits)
    assert result.output_truncated
    assert len(result.stdout) == 1 << 20
    assert not result.timed_out  # stopped when the cap was hit, not at the deadline
    [outcome] = sandbox.run_tests(program, [(b"", b"x")], limits=limits)
    assert outcome.output_truncated and outcome.passed is False
    assert len(outcome.stdout) == 1 << 20
    assert_no_leftovers(sandbox)


def test_binary_output_is_returned_verbatim(sandbox: Sandbox) -> None:
    program = "import sys\nsys.stdout.buffer.write(bytes(range(256)) + b'\\xff\\xfe')\n"
    result = sandbox.run(program)
    assert result.stdout == bytes(range(256)) + b"\xff\xfe"
    [outcome] = sandbox.run_tests(program, [TestCase(b"")])
    assert outcome.stdout == bytes(range(256)) + b"\xff\xfe"
    assert outcome.passed is None  # no expected output given


def test_megabytes_of_output(bwrap_box: Sandbox) -> None:
    program = "import sys\nsys.stdout.write('ab\\n' * 1_000_000)\n"  # 3 MB
    big = FAST.model_copy(update={"max_output_bytes": 8 << 20})
    [full] = bwrap_box.run_tests(program, [(b"", b"ab\n" * 1_000_000)], limits=big)
    assert full.passed and len(full.stdout) == 3_000_000 and not full.output_truncated
    small = FAST.model_copy(update={"max_output_bytes": 1 << 20})
    [cut] = bwrap_box.run_tests(program, [(b"", b"ab\n" * 1_000_000)], limits=small)
    assert cut.output_truncated and cut.passed is False and len(cut.stdout) == 1 << 20


def test_run_tests_per_test_stdin_and_time_limit(bwrap_box: Sandbox) -> None:
    program = "x = int(input())\nwhile x < 0:\n    pass\nprint(x * 2)\n"
    tests = [(b"1", b"2"), (b"-1", b"x"), (b"21\n", b"42"), (b"5", b"11")]
    outcomes = bwrap_box.run_tests(program, tests)
    assert [o.passed for o in outcomes] == [True, False, True, False]
    assert outcomes[1].killed is not None or outcomes[1].timed_out
    assert outcomes[2].stdout == b"42\n"
    stopped = bwrap_box.run_tests(program, tests, stop_on_failure=True)
    assert [o.passed for o in stopped] == [True, False, False, False]
    assert [o.error for o in stopped] == ["", "", "not_run", "not_run"]
    assert_no_leftovers(bwrap_box)


def test_whitespace_insensitive_comparison(bwrap_box: Sandbox) -> None:
    outcomes = bwrap_box.run_tests(
        "print('1 2'); print('3')", [(b"", b"1\n2 3"), (b"", b"1 2 3 \n\n"), (b"", b"1 23")]
    )
    assert [o.passed for o in outcomes] == [True, True, False]


def test_forged_result_lines_fail_closed(bwrap_box: Sandbox) -> None:
    forged = (
        "import os\nfor pid in (os.getppid(), 1):\n    for fd in (1, 2):\n        try:\n"
        "            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n"
        "                f.write('forged-line\\n')\n"
        "        except OSError:\n            pass\nprint('wrong')\n"
    )
    outcomes = bwrap_box.run_tests(forged, [(b"", b"right")] * 3)
    assert not any(o.passed for o in outcomes)


def test_slots_run_in_parallel_with_distinct_uids(bwrap_box: Sandbox) -> None:
    results = []
    program = "import os, time\ntime.sleep(1.0)\nprint(os.getuid())\n"
    threads = [
        threading.Thread(target=lambda: results.append(bwrap_box.run(program))) for _ in range(2)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - start < 1.9  # overlapped, not serialized
    uids = {int(r.stdout) for r in results}
    if IS_ROOT:
        assert uids == set(bwrap_box.uids)
    assert_no_leftovers(bwrap_box)


def test_refuses_to_run_unsandboxed_by_default() -> None:
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        Sandbox(SandboxSettings(backend="none"))


def test_missing_backend_is_refused_not_bypassed(tmp_path: Path) -> None:
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        Sandbox(
            SandboxSettings(
                backend="bwrap",
                bwrap_path=str(tmp_path / "no-bwrap"),
                work_dir=str(tmp_path / "work"),
            )
        )


def test_unsandboxed_only_when_allowed() -> None:
    with Sandbox(SandboxSettings(backend="none", allow_unsandboxed=True, slots=1)) as sb:
        result = sb.run("import os; print(os.getuid())")
        assert result.backend == "none"
        if IS_ROOT:
            assert int(result.stdout) == sb.uids[0]  # still not root
        assert_no_leftovers(sb)
