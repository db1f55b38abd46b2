"""Host-side isolation of sandbox slots: one unprivileged uid per slot (claimed with a lock file),
a pids cgroup per slot, listing and killing a uid's processes, and reaping their zombies.

Why each piece exists (measured facts): ``docs/sandbox.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def usable_by_others(path: Path) -> bool:
    """True when an unprivileged uid can execute ``path`` (every parent dir traversable)."""
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def become_subreaper() -> bool:
    """Orphans of our sandboxes (bwrap's pid-1 reaper exits after the outer bwrap) are then
    re-parented to this process instead of the machine's init, so we can reap them at once.
    Some inits reap late (seconds) and their zombies count against RLIMIT_NPROC and pids.max."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """Pids whose real or effective uid is ``uid`` (read from /proc/<pid>/status, which stays
    correct for non-dumpable processes whose /proc dir is owned by root). Zombies are dead and
    only wait for their parent (here often the machine's init) to reap them: skipped by
    default."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"State:") and b"Z" in line and not include_zombies:
                        break
                    if line.startswith(b"Uid:"):
                        real, effective = line.split()[1:3]
                        if int(real) == uid or int(effective) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue  # exited meanwhile
    return pids


def reap_zombies(uid: int) -> None:
    """Reap zombies of ``uid`` that are our children (never other code's children: those have
    other uids, so Popen.wait elsewhere is not robbed)."""
    me = str(os.getpid()).encode()
    for pid in processes_of_uid(uid, include_zombies=True):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        if b"\nState:\tZ" in status and b"\nPPid:\t" + me + b"\n" in status:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


class PidsCgroup:
    """One pids cgroup (v1 ``pids`` hierarchy or delegated v2) for one slot."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, name: str) -> PidsCgroup | None:
        v1 = Path("/sys/fs/cgroup/pids")
        v2 = Path("/sys/fs/cgroup")
        try:
            if (v1 / "cgroup.procs").exists():
                path = v1 / "promptcot-sandbox" / name
            elif "pids" in (v2 / "cgroup.controllers").read_text().split():
                parent = v2 / "promptcot-sandbox"
                parent.mkdir(exist_ok=True)
                (v2 / "cgroup.subtree_control").write_text("+pids")
                (parent / "cgroup.subtree_control").write_text("+pids")
                path = parent / name
            else:
                return None
            path.mkdir(parents=True, exist_ok=True)
            (path / "pids.max").write_text("max")
            return cls(path)
        except OSError as exc:
            log.warning("no pids cgroup for the sandbox (%s); relying on RLIMIT_NPROC", exc)
            return None

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def set_max(self, n: int) -> None:
        (self.path / "pids.max").write_text(str(n))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


@dataclass
class Slot:
    """One parallel run slot: its uid (None when not root: run as the caller), the lock that
    owns that uid machine-wide, and its cgroup."""

    index: int
    uid: int | None
    lock_fd: int | None = None
    cgroup: PidsCgroup | None = None


def claim_slot(index: int, lock_dir: Path, base_uid: int, uid_range: int, taken: set[int],
               use_cgroup: bool) -> Slot | None:
    """Claim the first free uid of the range (an exclusive flock on ``<lock_dir>/<uid>.lock``, so
    two worker processes on one machine never share a uid); None when all are taken."""
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    for uid in range(base_uid, base_uid + uid_range):
        if uid in taken:
            continue
        fd = os.open(lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # another worker process owns this uid
        slot = Slot(index, uid, fd)
        if use_cgroup:
            slot.cgroup = PidsCgroup.create(f"uid-{uid}")
        return slot
    return None


def release_slot(slot: Slot) -> None:
    if slot.cgroup is not None:
        slot.cgroup.remove()
    if slot.lock_fd is not None:
        os.close(slot.lock_fd)
        slot.lock_fd = None


def kill_slot_processes(slot: Slot, subreaper: bool, timeout: float = 5.0,
                        keep: frozenset[int] = frozenset()) -> None:
    """SIGKILL everything in the slot's cgroup and under its uid (but ``keep``) until nothing
    remains."""
    if slot.uid is None:
        return  # shared uid: the pid namespace teardown is all we can rely on
    deadline = time.monotonic() + timeout
    while True:
        if subreaper:
            reap_zombies(slot.uid)
        pids = set(processes_of_uid(slot.uid))
        if slot.cgroup is not None:
            pids.update(slot.cgroup.pids())
        pids -= keep
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.error("sandbox uid %d still has processes %s", slot.uid, sorted(pids))
            return
        time.sleep(0.005)
