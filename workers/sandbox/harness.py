"""The program that runs inside the sandbox and executes one solution against its tests.

The host sends this file's source into the sandbox (``python -S -c <source> prog scratch``) and
imports ``normalize_output`` from it, so the comparison rule has one definition.

Standard library only, cheap imports only (this start-up is paid once per solution), and nothing
at import time but definitions: ``main`` runs only as ``__main__``.

Protocol: stdin holds one ``marshal`` spec (nonce, salt, argv, tests with salted output digests,
limits). For each test the harness runs the program once with the test's stdin, enforces the
per-test wall time, and writes one line ``nonce + base64(marshal(result))`` to stdout. It makes
itself non-dumpable first, so the program cannot read its memory or fds (digests, nonce).
"""

import binascii
import marshal
import os
import select
import sys
import time

SIGKILL = 9  # not the signal module: it imports enum (~10 ms)
PR_SET_DUMPABLE = 4
SPAWN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def normalize_output(data: bytes) -> bytes:
    """Token-wise comparison form of a program output (whitespace-insensitive, like Codeforces'
    default checker). Used inside the sandbox and by the host."""
    return b" ".join(data.split())


def _sha256():
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    return sha256


def _read_all(fd: int) -> bytes:
    raw = b""
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return raw
        raw += chunk


def _reap_leftovers(own_pid_ns: bool) -> None:
    if own_pid_ns:
        try:
            os.kill(-1, SIGKILL)  # everything in the namespace but pid 1 and us
        except ProcessLookupError:
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def _run_one(argv: list[str], test_input: bytes, workdir: str, wall: float,
             cap: int) -> tuple[int, list[bytes], list[bytes], bool, bool, float]:
    stdin = os.memfd_create("stdin")  # no file the program could find
    os.write(stdin, test_input)
    os.lseek(stdin, 0, 0)
    os.mkdir(workdir)
    os.chdir(workdir)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.posix_spawn(argv[0], argv, SPAWN_ENV,
                         file_actions=[(os.POSIX_SPAWN_DUP2, stdin, 0),
                                       (os.POSIX_SPAWN_DUP2, out_w, 1),
                                       (os.POSIX_SPAWN_DUP2, err_w, 2)], setsid=True)
    for fd in (stdin, out_w, err_w):
        os.close(fd)
    chunks, errs, size, truncated, timed_out, status = [], [], 0, False, False, None
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(err_r, select.POLLIN)
    open_fds = {out_r, err_r}
    deadline = start + wall
    while not truncated:
        now = time.monotonic()
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                deadline = min(deadline, now + 0.1)  # a leaked child may hold the pipes
        if status is not None and not open_fds:
            break
        left = deadline - now
        if left <= 0:
            timed_out = status is None
            break
        if not open_fds:
            time.sleep(min(left, 0.002))
            continue
        for fd, _ in poller.poll(min(left, 0.05) * 1000):
            data = os.read(fd, 65536)
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
            elif fd == out_r:
                chunks.append(data)
                size += len(data)
                truncated = size > cap
            else:
                errs.append(data)
                if len(errs) > 8:
                    errs = errs[-4:]
    if status is None:
        try:
            os.killpg(pid, SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
    wall_time = time.monotonic() - start
    os.close(out_r)
    os.close(err_r)
    return status, chunks, errs, truncated, timed_out, wall_time


def main() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    sha256 = _sha256()
    spec = marshal.loads(_read_all(0))
    os.close(0)
    nonce, salt, cap = spec["nonce"], spec["salt"], spec["max_output"]
    program, scratch = sys.argv[1], sys.argv[2]
    argv = spec["argv"] + [program]
    own_pid_ns = spec["own_pid_ns"] and os.getpid() <= 2  # never kill(-1) outside our own ns

    for index, test in enumerate(spec["tests"]):
        status, chunks, errs, truncated, timed_out, wall = _run_one(
            argv, test["input"], f"{scratch}/run{index}", spec["wall"], cap)
        os.chdir(scratch)
        _reap_leftovers(own_pid_ns)
        code = os.waitstatus_to_exitcode(status)
        stdout = b"".join(chunks)[:cap]
        result = {"index": index, "stdout": stdout, "stderr": b"".join(errs)[-4096:],
                  "exit_code": code if code >= 0 else None, "killed": -code if code < 0 else None,
                  "wall_time": wall, "timed_out": timed_out, "truncated": truncated}
        failed = timed_out or truncated or code != 0
        if test["digest"] is not None:
            digest = sha256(salt + normalize_output(stdout)).hexdigest()
            failed = failed or digest != test["digest"]
        line = memoryview(nonce + binascii.b2a_base64(marshal.dumps(result)))
        while line:
            line = line[os.write(1, line):]
        if failed and spec["stop_on_failure"]:
            break


if __name__ == "__main__":
    main()
