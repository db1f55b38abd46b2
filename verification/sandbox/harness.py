"""The program that runs inside the sandbox: it takes solutions from the host and runs each one
against its tests, every solution in fresh namespaces with fresh private tmpfs mounts.

The host sends this file's source in (``python -S -c <source>``) and imports ``normalize_output``
and ``frame`` from it, so the comparison rule and the framing have one definition each. Standard
library only, cheap imports only, and nothing at import time but definitions.

Processes (``docs/sandbox.md`` has the whole picture):

- zygote: started once per slot, as the slot uid, inside the isolation (bwrap, or ``confine``
  below for the "unshare" kind). It holds CAP_SYS_ADMIN and CAP_SETPCAP in the sandbox's own
  user namespace only (needed to give each solution fresh mounts), never runs untrusted code, is
  non-dumpable, and waits for requests on stdin.
- per solution, a fork of the zygote ("solution") unshares mount, pid, net, ipc and uts
  namespaces, mounts a fresh size-capped tmpfs on /tmp and /dev/shm, writes the program
  read-only at /tmp/task/prog.py, and forks "runner": pid 1 of the new pid namespace. The runner
  drops every capability, sets the rlimits, and executes the program once per test (a fresh
  interpreter per test). When the runner exits the kernel kills whatever the solution left in
  its namespace.

Protocol: the host writes frames (8-byte big-endian length + ``marshal``) to stdin: one init
frame, then one frame per solution. The zygote answers ``ready`` once, then per solution one line
per test, ``nonce + base64(marshal(result))``, and finally ``nonce + b" end <code>"``. Only the
zygote and the runner hold the result channel; programs get their own pipes per test.
"""

import binascii
import marshal
import os
import select
import time

SIGKILL = 9  # not the signal module: it imports enum (~10 ms)
SPAWN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
PROGRAM = "/tmp/task/prog.py"
READ_ONLY_PROC = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")  # as bwrap does

# <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>, <linux/keyctl.h>
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x08000000, 0x10000000, 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
IPC_RMID = 0
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP = 1, 4, 24
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
CAP_SETPCAP, CAP_SYS_ADMIN = 8, 21
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_CLEAR, KEYCTL_GET_PERSISTENT = 1, 7, 22
KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -3, -4, -5
SYSCALLS = {
    "x86_64": {"pivot_root": 155, "keyctl": 250},
    "aarch64": {"pivot_root": 41, "keyctl": 219},
    "riscv64": {"pivot_root": 41, "keyctl": 219},
}


def normalize_output(data: bytes) -> bytes:
    """Token-wise comparison form of a program output (whitespace-insensitive, like Codeforces'
    default checker). Used inside the sandbox and by the host."""
    return b" ".join(data.split())


def frame(message: object) -> bytes:
    """One message of the host-to-zygote protocol."""
    data = marshal.dumps(message)
    return len(data).to_bytes(8, "big") + data


def _read_exact(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_frame(fd: int):
    """The next message on ``fd``; None at end of input."""
    header = _read_exact(fd, 8)
    if len(header) < 8:
        return None
    size = int.from_bytes(header, "big")
    data = _read_exact(fd, size)
    if len(data) < size:
        return None
    return marshal.loads(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Kernel:
    """The few system calls Python's os module lacks (through ctypes, loaded once by the
    zygote)."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long
        self.numbers = SYSCALLS.get(os.uname().machine, {})

        class Header(ctypes.Structure):  # struct __user_cap_header_struct
            _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

        class Data(ctypes.Structure):  # struct __user_cap_data_struct
            _fields_ = (
                ("effective", ctypes.c_uint32),
                ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32),
            )

        self.cap_header, self.cap_data = Header, Data * 2

    def check(self, result: int, what: str) -> int:
        if result < 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")
        return result

    def prctl(self, option: int, arg: int = 0) -> int:
        return self.check(self.libc.prctl(option, arg, 0, 0, 0), f"prctl {option}")

    def unshare(self, flags: int) -> None:
        self.check(self.libc.unshare(flags), "unshare")

    def mount(self, source, target: str, fstype, flags: int, data=None) -> None:
        def c(value):
            return value.encode() if isinstance(value, str) else value

        self.check(
            self.libc.mount(c(source), c(target), c(fstype), flags, c(data)), f"mount {target}"
        )

    def umount(self, target: str) -> None:
        self.check(self.libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        if "pivot_root" not in self.numbers:
            raise OSError(38, "pivot_root: unknown system call number on this machine")
        self.check(
            self.libc.syscall(self.numbers["pivot_root"], new_root.encode(), put_old.encode()),
            "pivot_root",
        )

    def keyctl(self, operation: int, *args: int) -> int:
        if "keyctl" not in self.numbers:
            return -1
        values = [self.ctypes.c_long(a) for a in args] + [self.ctypes.c_long(0)] * (4 - len(args))
        return self.libc.syscall(self.numbers["keyctl"], self.ctypes.c_long(operation), *values)

    def set_capabilities(self, keep: int) -> None:
        """Effective = permitted = ``keep`` (a bit mask), nothing inheritable or ambient, and
        every other capability out of the bounding set."""
        self.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        for cap in range(64):
            if not keep & (1 << cap):
                self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap
        data = self.cap_data()
        for word in (0, 1):
            bits = (keep >> (32 * word)) & 0xFFFFFFFF
            data[word].effective = data[word].permitted = bits
        header = self.cap_header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        self.check(self.libc.capset(self.ctypes.byref(header), data), "capset")


# --- the view of the "unshare" kind (bwrap builds the same from its arguments) ----------------


def _mount_point(path: str, like: str) -> None:
    if os.path.isdir(like):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _bind(k: Kernel, source: str, target: str, read_only: bool) -> None:
    _mount_point(target, source)
    k.mount(source, target, None, MS_BIND | MS_REC)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | (MS_RDONLY | MS_NODEV if read_only else 0)
    k.mount(None, target, None, flags)


def confine(k: Kernel, init: dict) -> None:
    """Enter new user, mount, pid, net, ipc, uts and cgroup namespaces and a new root that holds
    only the interpreter's paths (read-only), /dev with a few device nodes, a fresh /proc, and
    size-capped tmpfs mounts on /tmp and /dev/shm. Nested user namespaces are disabled. Returns in
    the namespace's pid 1; the calling process stays outside and exits with its status."""
    view = init["view"]
    k.prctl(PR_SET_NO_NEW_PRIVS, 1)
    k.prctl(PR_SET_PDEATHSIG, SIGKILL)
    uid, gid = os.getuid(), os.getgid()
    k.unshare(
        CLONE_NEWUSER
        | CLONE_NEWNS
        | CLONE_NEWPID
        | CLONE_NEWNET
        | CLONE_NEWIPC
        | CLONE_NEWUTS
        | CLONE_NEWCGROUP
    )
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    pid = os.fork()
    if pid:  # outside: wait for the namespace's pid 1 and exit like it, holding nothing
        os.close(0)
        k.set_capabilities(0)
        k.prctl(PR_SET_DUMPABLE, 0)
        status = os.waitpid(pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    k.prctl(PR_SET_PDEATHSIG, SIGKILL)
    os.setsid()
    k.mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = "/tmp"  # any directory will do: in this private mount namespace it only hosts the root
    k.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in view["ro_paths"]:
        _bind(k, path, root + path, read_only=True)
    for link, target in view["symlinks"]:
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        os.symlink(target, root + link)
    os.makedirs(root + "/dev", exist_ok=True)
    for device in init["devices"]:
        if os.path.exists("/dev/" + device):
            _bind(k, "/dev/" + device, root + "/dev/" + device, read_only=False)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, root + "/dev/" + name)
    for path, size, mode in (
        ("/tmp", init["tmp_size"], "0755"),
        ("/dev/shm", init["shm_size"], "1777"),
    ):
        os.makedirs(root + path, exist_ok=True)
        k.mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode={mode}")
    os.makedirs(root + "/proc", exist_ok=True)
    k.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with open(root + "/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")  # this namespace may create no further user namespaces
    for path in READ_ONLY_PROC:
        if os.path.exists(root + path):
            _bind(k, root + path, root + path, read_only=True)
    os.mkdir(root + "/.old-root")
    k.pivot_root(root, root + "/.old-root")
    os.chdir("/")
    k.umount("/.old-root")
    os.rmdir("/.old-root")
    k.mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    k.set_capabilities((1 << CAP_SYS_ADMIN) | (1 << CAP_SETPCAP))


# --- one solution --------------------------------------------------------------------------


def _fresh_keyrings(k: Kernel) -> None:
    """Keys are per uid and user namespace, which solutions of one slot share: give this solution
    a new session keyring and empty the user keyrings."""
    k.keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0)
    for keyring in (KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING):
        k.keyctl(KEYCTL_CLEAR, keyring)
    persistent = k.keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING)
    if persistent > 0:
        k.keyctl(KEYCTL_CLEAR, persistent)


def _wait_for(pid: int) -> int:
    """Wait for ``pid``, reaping any other child or orphan on the way (the zygote is pid 1)."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return os.waitstatus_to_exitcode(status)


def solution(k, init: dict, request: dict) -> None:
    """Process "solution": fresh namespaces and mounts, then the runner. Never returns."""
    os.close(0)
    isolated = init["kind"] != "none"
    if isolated:
        # a network namespace per solution too: the slot's (bwrap brings its loopback up)
        # would carry one solution's sockets (TIME_WAIT, /proc/net) into the next
        k.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        k.mount(None, "/", None, MS_REC | MS_PRIVATE)
        k.mount(
            "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={request['tmp_size']},mode=0755"
        )
        os.mkdir("/tmp/task")
        with open(PROGRAM, "wb") as f:
            f.write(request["program"])
        _bind(k, "/tmp/task", "/tmp/task", read_only=True)
        k.mount(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MS_NOSUID | MS_NODEV | MS_NOEXEC,
            f"size={request['shm_size']},mode=1777",
        )
        _fresh_keyrings(k)
        scratch, program = "/tmp", PROGRAM
    else:
        scratch = f"{init['scratch']}/s{os.getpid()}"
        os.mkdir(scratch, 0o700)
        os.mkdir(scratch + "/task")
        program = scratch + "/task/prog.py"
        with open(program, "wb") as f:
            f.write(request["program"])
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            runner(k if isolated else None, request, scratch, program, own_pid_ns=isolated)
            code = 0
        except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    code = _wait_for(pid)
    if not isolated:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    os._exit(code if code >= 0 else 128 - code)


# --- the runner: the solution's tests, one fresh interpreter each --------------------------


def _reap_leftovers(own_pid_ns: bool) -> None:
    if own_pid_ns:
        try:
            os.kill(-1, SIGKILL)  # everything in the namespace but us (pid 1)
        except ProcessLookupError:
            pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def _run_one(
    argv: list, test_input: bytes, workdir: str, wall: float, cap: int, stderr_cap: int
) -> tuple:
    stdin = os.memfd_create("stdin")  # no file the program could find
    os.write(stdin, test_input)
    os.lseek(stdin, 0, 0)
    os.mkdir(workdir)
    os.chdir(workdir)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.posix_spawn(
        argv[0],
        argv,
        SPAWN_ENV,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
        ],
        setsid=True,
    )
    for fd in (stdin, out_w, err_w):
        os.close(fd)
    try:
        # the program is the first victim when the slot's memory cgroup is full, not the
        # harness; it has exec'd but not started yet (posix_spawn returns after the exec)
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    chunks, errs, size, err_size = [], [], 0, 0
    truncated, timed_out, status = False, False, None
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
                errs.append(data)  # keep the tail
                err_size += len(data)
                while err_size - len(errs[0]) >= stderr_cap:
                    err_size -= len(errs.pop(0))
    if status is None:
        try:
            os.killpg(pid, SIGKILL)
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
    wall_time = time.monotonic() - start
    os.close(out_r)
    os.close(err_r)
    stderr = b"".join(errs)[-stderr_cap:]
    return status, b"".join(chunks)[:cap], stderr, truncated, timed_out, wall_time


def _fresh_proc(k: Kernel) -> None:
    """A /proc of the solution's own pid namespace (we are its pid 1): programs see their own
    processes only, and pids from posix_spawn name the same processes in /proc."""
    k.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for path in READ_ONLY_PROC:
        if os.path.exists(path):
            _bind(k, path, path, read_only=True)


def _sha256():
    try:
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    return sha256


def runner(k, request: dict, scratch: str, program: str, own_pid_ns: bool) -> None:
    """Process "runner" (pid 1 of the solution's pid namespace): drop privileges, set the
    limits, run every test, write one result line each."""
    import resource

    if k is not None:
        _fresh_proc(k)
        k.set_capabilities(0)
    for name, (soft, hard) in request["rlimits"].items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
    sha256 = _sha256()
    nonce, salt, cap = request["nonce"], request["salt"], request["max_output"]
    argv = request["argv"] + [program]
    for index, test in enumerate(request["tests"]):
        status, stdout, stderr, truncated, timed_out, wall = _run_one(
            argv,
            test["input"],
            f"{scratch}/run{index}",
            request["wall"],
            cap,
            request["stderr_cap"],
        )
        os.chdir(scratch)
        _reap_leftovers(own_pid_ns)
        code = os.waitstatus_to_exitcode(status)
        result = {
            "index": index,
            "stdout": stdout,
            "stderr": stderr,
            "exit_code": code if code >= 0 else None,
            "killed": -code if code < 0 else None,
            "wall_time": wall,
            "timed_out": timed_out,
            "truncated": truncated,
        }
        failed = timed_out or truncated or code != 0
        if test["digest"] is not None:
            digest = sha256(salt + normalize_output(stdout)).hexdigest()
            failed = failed or digest != test["digest"]
        _write_all(1, nonce + binascii.b2a_base64(marshal.dumps(result)))
        if failed and request["stop_on_failure"]:
            break
    if own_pid_ns:
        _remove_sysv_ipc()


def _remove_sysv_ipc() -> None:
    """Remove the solution's SysV shared memory, semaphores and message queues. Its IPC
    namespace dies with it anyway, but the kernel frees a dead namespace later, from a work
    queue: its pages would still count against the slot's memory cgroup when the next solution
    starts. Nothing is attached any more (every program was killed), so this frees them now."""
    import ctypes

    libc = ctypes.CDLL(None)
    remove = {
        "shm": lambda ident: libc.shmctl(ident, IPC_RMID, None),
        "sem": lambda ident: libc.semctl(ident, 0, IPC_RMID),
        "msg": lambda ident: libc.msgctl(ident, IPC_RMID, None),
    }
    for kind in ("shm", "sem", "msg"):
        try:
            with open("/proc/sysvipc/" + kind) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            remove[kind](int(row.split()[1]))  # the second column is the id


# --- the zygote ------------------------------------------------------------------------------


def zygote() -> None:
    init = read_frame(0)
    isolated = init["kind"] != "none"
    k = Kernel() if isolated else None
    import resource  # noqa: F401 - loaded once here, used by every runner

    _sha256()  # likewise

    if init["kind"] == "unshare":
        confine(k, init)
    os.chdir("/" if isolated else init["scratch"])
    if k is not None:
        # only what the per-solution namespaces need (bwrap also passes them as ambient)
        k.set_capabilities((1 << CAP_SYS_ADMIN) | (1 << CAP_SETPCAP))
        k.prctl(PR_SET_DUMPABLE, 0)  # no process of the slot uid may read our memory or fds
    else:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    _write_all(1, b"ready\n")
    while True:
        request = read_frame(0)
        if request is None:
            return
        pid = os.fork()
        if pid == 0:
            try:
                solution(k, init, request)
            except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
                import traceback

                traceback.print_exc()
            finally:
                os._exit(70)
        code = _wait_for(pid)
        _write_all(1, request["nonce"] + b" end %d\n" % code)


if __name__ == "__main__":
    zygote()
