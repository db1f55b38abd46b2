"""Security tests of the sandbox (verification/sandbox/) with real bwrap / unshare and real
processes: each attack runs on both isolation kinds.

Every containment test also asserts that no live process of the slot uids remains afterwards.
"""

from __future__ import annotations

import ast
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import BACKENDS, FAST, IS_ROOT, assert_no_leftovers, sandbox_fixture
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import BACKENDS, FAST, IS_ROOT, assert_no_leftovers, sandbox_fixture

from verification.sandbox import Sandbox


@pytest.fixture(scope="module", params=BACKENDS)
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    yield from sandbox_fixture(request.param)


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
    # The CPU limit ended it (SIGXCPU, then SIGKILL at the hard limit), not the wall clock.
    assert result.killed in (signal.SIGXCPU, signal.SIGKILL) and not result.timed_out
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
    # the interpreter is the only executable the sandbox has (no sleep, no sh): it stands in
    # for both, a sleeper and a busy loop, each in a new session
    program = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'],"
        " start_new_session=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'while True: pass'], start_new_session=True,"
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


# --- the sandbox must not see the host (issue 10, item 7) ----------------------------------------

# Top-level entries of the sandbox's root: the interpreter's prefix, the merged-/usr symlinks,
# and the sandbox's own /tmp, /dev and /proc. No /home, /root, /work, /etc, /var, /run, /opt ...
ALLOWED_ROOT = {"usr", "lib", "lib64", "lib32", "libx32", "bin", "sbin", "tmp", "dev", "proc"}


@pytest.fixture
def host_secrets() -> Iterator[list[Path]]:
    """World-readable files where a program could look: the host's /tmp, this checkout, the
    sandbox work dir (other runs' outputs)."""
    token = secrets.token_hex(8)
    paths = [
        Path("/tmp") / f"promptcot-secret-{token}",
        Path(__file__).resolve().parent / f".promptcot-secret-{token}",
        Path("/tmp/promptcot-sandbox") / f"secret-{token}",
    ]
    for path in paths:
        path.write_text("secret " + token)
        path.chmod(0o644)
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_host_files_are_invisible(sandbox: Sandbox, host_secrets: list[Path]) -> None:
    here = Path(__file__).resolve()
    targets = [
        *map(str, host_secrets),
        str(here),
        str(here.parent.parent / "README.md"),
        "/etc/passwd",
        "/etc/hostname",
        "/root",
        "/home",
        "/work",
        "/var/log",
        "/tmp/promptcot-sandbox",
        "/proc/1/root/etc/passwd",
        "/sys/class/net",
    ]
    program = (
        f"targets = {targets!r}\n"
        "import os\nfor t in targets:\n"
        "    try:\n        data = os.listdir(t) if os.path.isdir(t) else open(t).read()\n"
        "        print('LEAKED', t, repr(data)[:80])\n"
        "    except OSError as exc:\n        print('absent', t, type(exc).__name__)\n"
        "print('root', sorted(os.listdir('/')))\n"
    )
    result = sandbox.run(program)
    assert result.exit_code == 0, result.stderr
    assert b"LEAKED" not in result.stdout, result.stdout.decode()
    root = ast.literal_eval(result.stdout.decode().splitlines()[-1].removeprefix("root "))
    assert set(root) <= ALLOWED_ROOT, root
    assert_no_leftovers(sandbox)


def test_dev_shm_is_a_small_private_tmpfs(sandbox: Sandbox) -> None:
    token = secrets.token_hex(8)
    program = (
        "import os\nwritten = 0\nchunk = b'x' * (1 << 20)\n"
        "try:\n"
        "    for i in range(256):\n"  # files of 4 MB each: RLIMIT_FSIZE caps one file only
        f"        with open(f'/dev/shm/{token}-{{i}}', 'wb') as f:\n"
        "            for _ in range(4):\n                f.write(chunk)\n"
        "                f.flush()\n                written += len(chunk)\n"
        "except OSError as exc:\n    print('stopped', type(exc).__name__)\n"
        "st = os.statvfs('/dev/shm')\nprint(written, st.f_blocks * st.f_frsize)\n"
    )
    result = sandbox.run(program)
    written, size = map(int, result.stdout.split()[-2:])
    cap = 4 * FAST.max_file_mb << 20
    assert size <= cap and written <= cap, (written, size)
    assert not list(Path("/dev/shm").glob(f"{token}-*")), "files reached the host's /dev/shm"
    assert_no_leftovers(sandbox)


def test_writes_never_reach_the_host(sandbox: Sandbox) -> None:
    token = secrets.token_hex(8)
    dirs = ["/dev/shm", "/tmp", "/var/tmp", "/run/lock", "/run/shm", "/dev/mqueue"]
    program = (
        f"import os\nfor d in {dirs!r}:\n"
        f"    try:\n        open(os.path.join(d, 'promptcot-{token}'), 'w').write('x')\n"
        "        print('wrote', d)\n"
        "    except OSError as exc:\n        print('denied', d, type(exc).__name__)\n"
    )
    result = sandbox.run(program)
    assert result.exit_code == 0, result.stderr
    leaked = [d for d in dirs if (Path(d) / f"promptcot-{token}").exists()]
    for d in leaked:
        (Path(d) / f"promptcot-{token}").unlink()
    assert leaked == []
    assert_no_leftovers(sandbox)


def test_every_writable_mount_is_a_capped_private_tmpfs(sandbox: Sandbox) -> None:
    program = "print(open('/proc/self/mountinfo').read())"
    result = sandbox.run(program)
    assert result.exit_code == 0, result.stderr
    cap = 4 * FAST.max_file_mb << 20
    for line in result.stdout.decode().splitlines():
        fields = line.split()
        if not fields:
            continue
        mount_point, options = fields[4], fields[5].split(",")
        fstype, super_options = line.split(" - ")[1].split()[0], line.split(" - ")[1].split()[2]
        if "ro" in options or fstype in ("proc", "devpts"):
            continue
        if fstype == "devtmpfs" or mount_point.startswith("/dev/") and fstype != "tmpfs":
            assert mount_point in {
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty",
            }, line  # device nodes only
            continue
        assert fstype == "tmpfs", line
        size = [o for o in super_options.split(",") if o.startswith("size=")]
        assert size, f"uncapped tmpfs: {line}"
        value = size[0].removeprefix("size=")
        units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
        number = int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)
        assert number <= cap, line
    assert_no_leftovers(sandbox)


def test_nested_user_namespace_is_refused(sandbox: Sandbox) -> None:
    program = (
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x20000\n"
        "if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:\n"
        "    print('refused', os.strerror(ctypes.get_errno()))\n"
        "else:\n"
        "    print('uid', os.getuid())\n"
        "    ok = libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=100g') == 0\n"
        "    print('mounted 100g tmpfs' if ok else 'mount refused')\n"
    )
    result = sandbox.run(program)
    assert result.stdout.startswith(b"refused"), result.stdout
    assert_no_leftovers(sandbox)


def test_program_has_no_capabilities_and_cannot_mount(sandbox: Sandbox) -> None:
    program = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith(('Cap', 'NoNewPrivs')):\n        print(line.strip())\n"
        "print('mount', libc.mount(b'tmpfs', b'/tmp', b'tmpfs', 0, b'size=100g'))\n"
        "print('remount', libc.mount(None, b'/', None, 32 | 4096, None))\n"  # MS_REMOUNT|BIND rw
        "print('unshare', libc.unshare(0x20000 | 0x8000000))\n"  # CLONE_NEWNS | CLONE_NEWIPC
    )
    result = sandbox.run(program)
    lines = dict(line.split(":", 1) for line in result.stdout.decode().splitlines() if ":" in line)
    for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(lines[name], 16) == 0, (name, lines[name])
    assert lines["NoNewPrivs"].strip() == "1"
    for attempt in (b"mount -1", b"remount -1", b"unshare -1"):
        assert attempt in result.stdout, result.stdout
    assert_no_leftovers(sandbox)


# Memory that no rlimit counts: SysV shared memory outlives its mapping (RLIMIT_AS counts it only
# while attached) and a memfd is a file of the kernel's internal tmpfs (RLIMIT_FSIZE caps each one,
# not their number). Only the slot's memory cgroup bounds them.
SHM_FLOOD = (
    "import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.shmat.restype = ctypes.c_void_p\nheld, size = 0, 32 << 20\n"
    "for _ in range(40):\n"
    "    sid = libc.shmget(0, size, 0o1000 | 0o600)\n"  # IPC_PRIVATE, IPC_CREAT
    "    if sid < 0:\n        print('refused', ctypes.get_errno()); break\n"
    "    addr = libc.shmat(sid, None, 0)\n"
    "    if addr in (None, 2 ** 64 - 1):\n        print('refused', ctypes.get_errno()); break\n"
    "    ctypes.memset(addr, 1, size)\n    libc.shmdt(ctypes.c_void_p(addr))\n"
    "    held += size\n    print(held >> 20, flush=True)\n"
)
MEMFD_FLOOD = (
    "import os\nheld, fds, chunk = 0, [], b'x' * (1 << 20)\n"
    "try:\n    for _ in range(160):\n        fd = os.memfd_create('x')\n        fds.append(fd)\n"
    "        for _ in range(8):\n            os.write(fd, chunk)\n"
    "        held += 8 << 20\n        print(held >> 20, flush=True)\n"
    "except OSError as exc:\n    print('refused', exc.errno)\n"
)


@pytest.mark.parametrize("flood", [SHM_FLOOD, MEMFD_FLOOD], ids=["sysv_shm", "memfd"])
def test_memory_outside_rlimits_is_capped(sandbox: Sandbox, flood: str) -> None:
    if not IS_ROOT:
        pytest.skip("the memory cgroup needs root")
    result = sandbox.run(flood)
    held = [int(line) for line in result.stdout.split() if line.isdigit()]
    # the cgroup holds the program's memory_mb, the two tmpfs, and the harness
    assert max(held, default=0) < FAST.memory_mb + 5 * FAST.max_file_mb + 128, result.stdout
    assert_no_leftovers(sandbox)
