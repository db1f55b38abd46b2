"""The zygote (verification/sandbox/zygote.py and the harness's per-solution fork): one sandboxed
harness per slot serves every solution, and still each solution starts from a clean slate: its
own pid namespace and /proc, fresh /tmp and /dev/shm, no IPC objects, keys or processes of the
previous one, and the limits of its own request."""

from __future__ import annotations

import ast
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import BACKENDS, FAST, IS_ROOT, assert_no_leftovers, sandbox_fixture
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import BACKENDS, FAST, IS_ROOT, assert_no_leftovers, sandbox_fixture

from verification.sandbox import Sandbox

# Everything a solution can leave behind in a sandbox that is reused, each in its own way.
LEAVE_TRACES = r"""
import ctypes, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
for path in ("/tmp/trace", "/dev/shm/trace", "trace-in-cwd", "/tmp/task/trace"):
    try:
        open(path, "w").write("from the previous solution")
    except OSError as exc:
        print("cannot write", path, exc.errno)
libc.shmget(0x5eed, 4096, 0o1000 | 0o666)                        # SysV shared memory, IPC_CREAT
libc.semget(0x5eed, 1, 0o1000 | 0o666)                           # SysV semaphore
libc.msgget(0x5eed, 0o1000 | 0o666)                              # SysV message queue
libc.mq_open(b"/trace", os.O_CREAT | os.O_RDWR, 0o600, None)     # POSIX message queue
if os.uname().machine == "x86_64":                               # keyrings: add_key(2)
    for keyring in (-4, -5, -3):                                 # user, user-session, session
        libc.syscall(248, b"user", b"trace", b"secret", 6, keyring)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print("left traces", os.getpid())
"""

LOOK_FOR_TRACES = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = []
for path in ("/tmp/trace", "/dev/shm/trace", "/tmp/run0/trace-in-cwd", "/tmp/task/trace"):
    if os.path.exists(path):
        found.append(path)
found += [name for name in os.listdir("/tmp") if name not in ("task", "run0")]
found += os.listdir("/dev/shm")
for kind in ("shm", "sem", "msg"):
    rows = open("/proc/sysvipc/" + kind).read().splitlines()[1:]
    found += [kind + " " + row.split()[0] for row in rows]
if libc.mq_open(b"/trace", os.O_RDWR, 0o600, None) >= 0:
    found.append("mqueue /trace")
if os.uname().machine == "x86_64" and libc.syscall(249, b"user", b"trace", None, 0) >= 0:
    found.append("key trace")                                    # request_key(2)
found += [pid for pid in os.listdir("/proc") if pid.isdigit() and int(pid) > 2]
print("pid", os.getpid(), "ppid", os.getppid())
print("found", found)
"""


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    yield from sandbox_fixture(request.param, slots=1)


def zygote(sb: Sandbox) -> frozenset[int]:
    [pids] = sb.zygote_pids().values()
    return pids


def test_one_zygote_serves_successive_solutions(sandbox: Sandbox) -> None:
    sandbox.run("print(1)")
    before = zygote(sandbox)
    for _ in range(3):
        result = sandbox.run("import os; print(os.getpid(), os.getppid())")
        assert result.stdout == b"2 1\n"  # its own pid namespace each time, under the runner
    if IS_ROOT:
        assert zygote(sandbox) == before and len(before) == 2
    assert_no_leftovers(sandbox)


def test_nothing_of_a_previous_solution_is_visible(sandbox: Sandbox) -> None:
    left = sandbox.run(LEAVE_TRACES)
    assert b"left traces" in left.stdout, left.stdout + left.stderr
    assert b"cannot write /tmp/trace" not in left.stdout  # the traces were really written
    assert b"cannot write /tmp/task/trace" in left.stdout  # the program is read-only
    before = zygote(sandbox)
    looked = sandbox.run(LOOK_FOR_TRACES)
    assert looked.stdout.splitlines()[-1] == b"found []", looked.stdout + looked.stderr
    assert zygote(sandbox) == before  # same zygote: a clean slate by construction, not restart
    assert_no_leftovers(sandbox)


def test_traces_are_visible_within_one_solution(sandbox: Sandbox) -> None:
    """The check above can see traces: between the tests of ONE solution they persist (one
    /tmp, one IPC namespace per solution)."""
    outcomes = sandbox.run_tests(LEAVE_TRACES + "\n" + LOOK_FOR_TRACES, [(b"", None)])
    found = outcomes[0].stdout.splitlines()[-1]
    for trace in (b"/tmp/trace", b"/dev/shm/trace", b"shm ", b"sem ", b"msg ", b"mqueue"):
        assert trace in found, (trace, found)
    assert_no_leftovers(sandbox)


def test_each_solution_gets_the_limits_of_its_own_request(sandbox: Sandbox) -> None:
    program = (
        "import os, resource\nprint([resource.getrlimit(getattr(resource, 'RLIMIT_' + n))"
        "[0] for n in ('AS', 'CPU', 'NPROC', 'FSIZE')])\n"
        "st = os.statvfs('/tmp'); sh = os.statvfs('/dev/shm')\n"
        "print(st.f_blocks * st.f_frsize, sh.f_blocks * sh.f_frsize)\n"
    )
    small = FAST
    big = FAST.model_copy(
        update={"memory_mb": 300, "cpu_seconds": 3, "max_processes": 12, "max_file_mb": 4}
    )
    for limits in (small, big, small):
        lines = sandbox.run(program, limits=limits).stdout.decode().splitlines()
        memory, cpu, nproc, fsize = ast.literal_eval(lines[0])
        assert memory == limits.memory_mb << 20 and cpu == limits.cpu_seconds
        assert fsize == limits.max_file_mb << 20
        assert nproc >= limits.max_processes
        tmp, shm = map(int, lines[1].split())
        assert tmp == 4 * limits.max_file_mb << 20 and shm == limits.max_file_mb << 20
    assert_no_leftovers(sandbox)


# Socket state a solution can leave in its network namespace: a connection closed by the
# accepting side first stays in TIME_WAIT for a minute after every process is gone, and holds
# its port. It also keeps one socket listening while it looks, so the look can see something.
LEAVE_SOCKETS = r"""
import socket
held = socket.socket()
held.bind(("127.0.0.1", 4243))
held.listen(1)
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        server = socket.socket(family)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, 4242))
        server.listen(1)
        client = socket.create_connection((host, 4242), timeout=1)
        accepted, _ = server.accept()
        accepted.close()  # the accepting side closes first: its end waits in TIME_WAIT
        client.close()
        server.close()
        print("left TIME_WAIT on", host)
    except OSError as exc:
        print("no connection on", host, exc.errno)
"""

LOOK_FOR_SOCKETS = r"""
import errno, socket
found = []
for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix"):
    try:
        rows = open("/proc/net/" + table).read().splitlines()[1:]
    except OSError:
        continue
    found += [table + " " + " ".join(row.split()[1:4]) for row in rows]
for port in (4242, 4243):
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError as exc:
        found.append("bind %d: %s" % (port, errno.errorcode[exc.errno]))
    probe.close()
print("sockets", found)
"""


def test_no_socket_state_of_a_previous_solution_is_visible(sandbox: Sandbox) -> None:
    """Each solution has a network namespace of its own: sockets one leaves (TIME_WAIT holds a
    port for a minute after its processes are gone) are neither listed in /proc/net nor block a
    bind() in the next solution of the slot."""
    left = sandbox.run(LEAVE_SOCKETS)
    assert left.exit_code == 0, left.stdout + left.stderr
    looked = sandbox.run(LOOK_FOR_SOCKETS)
    assert looked.stdout.splitlines()[-1] == b"sockets []", looked.stdout + looked.stderr
    assert_no_leftovers(sandbox)


def test_socket_state_is_visible_within_one_solution(sandbox: Sandbox) -> None:
    """The look above can see socket state: its own listening socket, in /proc/net/tcp and as
    a port bind() refuses."""
    result = sandbox.run(LEAVE_SOCKETS + "\n" + LOOK_FOR_SOCKETS)
    found = result.stdout.splitlines()[-1]
    assert b"tcp 0100007F:1093 00000000:0000 0A" in found, result.stdout + result.stderr
    assert b"bind 4243: EADDRINUSE" in found, found
    assert_no_leftovers(sandbox)


ATTACKS = {
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
    "        pass\n",
    "cpu loop": "while True:\n    pass\n",
    "kill everything": "import os\nfor pid in range(1, 400):\n    try:\n        os.kill(pid, 9)\n"
    "    except OSError:\n        pass\n",
    "fill /dev/shm": "open('/dev/shm/x', 'wb').write(b'x' * (64 << 20))\n",
    "sysv flood": "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
    "for _ in range(40):\n    a = libc.shmat(libc.shmget(0, 32 << 20, 0o1600), None,"
    " 0)\n    ctypes.memset(a, 1, 32 << 20)\n    libc.shmdt(ctypes.c_void_p(a))\n",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_do_not_outlive_their_solution(sandbox: Sandbox, attack: str) -> None:
    sandbox.run(ATTACKS[attack])
    looked = sandbox.run(LOOK_FOR_TRACES)
    assert looked.stdout.splitlines()[-2:] == [b"pid 2 ppid 1", b"found []"], looked
    assert_no_leftovers(sandbox)


@pytest.mark.skipif(not IS_ROOT, reason="the zygote's host pids are listed for root only")
def test_a_dead_zygote_is_replaced(sandbox: Sandbox) -> None:
    sandbox.run("print(1)")
    for pid in zygote(sandbox):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert sandbox.run("print(2)").stdout == b"2\n"
    assert_no_leftovers(sandbox)


@pytest.mark.skipif(not IS_ROOT, reason="the zygote's host pids are listed for root only")
def test_a_stuck_zygote_is_killed_at_the_deadline_and_replaced(sandbox: Sandbox) -> None:
    sandbox.run("print(1)")
    stuck = zygote(sandbox)
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    [outcome] = sandbox.run_tests("print(1)", [(b"", b"1")], limits=FAST)
    assert outcome.error == "sandbox_failed" and outcome.passed is False
    assert time.monotonic() - start < FAST.wall_seconds + 5
    assert sandbox.run("print(2)").stdout == b"2\n"
    assert zygote(sandbox).isdisjoint(stuck)
    assert_no_leftovers(sandbox)


def test_a_zygote_that_cannot_start_fails_the_solution_closed(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E.g. the machine is out of processes: the solution fails (sandbox_failed), the caller
    does not get an exception, and the next solution starts a zygote again."""
    for slot in sandbox._all_slots:
        sandbox._stop_zygote(slot)
    monkeypatch.setattr(sandbox, "_command", lambda kind, slot: ["/nonexistent/sandbox"])
    [outcome] = sandbox.run_tests("print(1)", [(b"", b"1")])
    assert outcome.error == "sandbox_failed" and outcome.passed is False
    assert b"nonexistent" in outcome.stderr
    monkeypatch.undo()
    assert sandbox.run("print(2)").stdout == b"2\n"
    assert_no_leftovers(sandbox)


@pytest.mark.skipif(not IS_ROOT, reason="the zygote's host pids are listed for root only")
def test_the_zygote_keeps_two_capabilities_and_is_not_dumpable(sandbox: Sandbox) -> None:
    sandbox.run("print(1)")
    [zygote_process] = sandbox._zygotes.values()
    [harness] = zygote(sandbox) - {zygote_process.proc.pid}  # the other one is bwrap / outside
    text = Path(f"/proc/{harness}/status").read_text()
    status = dict(line.split(":", 1) for line in text.splitlines())
    for name in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[name], 16) == (1 << 21) | (1 << 8), name  # CAP_SYS_ADMIN, CAP_SETPCAP
    assert int(status["CapAmb"], 16) == 0 and int(status["CapInh"], 16) == 0
    assert int(status["Uid"].split()[0]) in sandbox.uids
    for private in ("environ", "fd", "mem"):  # non-dumpable: these are root's, not the uid's
        assert os.stat(f"/proc/{harness}/{private}").st_uid == 0
    if sandbox.backend == "unshare":  # the outer process, waiting in the host's pid namespace
        outer = Path(f"/proc/{zygote_process.proc.pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in outer and "CapPrm:\t0000000000000000" in outer
