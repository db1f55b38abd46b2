"""Host-side isolation of sandbox slots: one unprivileged uid per slot (claimed with a lock file),
pids and memory cgroups per slot, listing and killing a uid's processes, and reaping zombies.

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
from dataclasses import dataclass, field
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


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path for a v1 ``controller`` ("" for v2's single hierarchy)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    except OSError:
        pass
    return "/"


class Cgroup:
    """One cgroup directory of a slot: a v1 hierarchy's (one controller) or the v2 hierarchy's
    (several controllers). v1: created below this process's own cgroup, so the sandbox stays
    inside whatever limits the worker runs under. v2: created at the root of the hierarchy this
    process sees (a v2 cgroup with processes cannot delegate controllers to children); in a
    container with its own cgroup namespace that root is the container's cgroup."""

    def __init__(self, path: Path, controllers: tuple[str, ...]):
        self.path = path
        self.controllers = controllers

    @classmethod
    def create_for_slot(
        cls,
        name: str,
        wanted: tuple[str, ...] = ("pids", "memory"),
    ) -> list[Cgroup]:
        """The slot's cgroups for the ``wanted`` controllers this machine lets us use."""
        groups = []
        if (CGROUP_ROOT / "cgroup.controllers").exists():  # v2 (delegated or root)
            try:
                available = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
                controllers = tuple(c for c in wanted if c in available)
                if controllers:
                    parent = CGROUP_ROOT / "promptcot-sandbox"
                    parent.mkdir(exist_ok=True)
                    enable = " ".join("+" + c for c in controllers)
                    (CGROUP_ROOT / "cgroup.subtree_control").write_text(enable)
                    (parent / "cgroup.subtree_control").write_text(enable)
                    groups.append(cls(parent / name, controllers))
            except OSError as exc:
                log.warning("no cgroup for the sandbox (%s)", exc)
        else:
            for controller in wanted:
                hierarchy = CGROUP_ROOT / controller
                if not (hierarchy / "cgroup.procs").exists():
                    continue
                own = _own_cgroup(controller).strip("/")
                groups.append(cls(hierarchy / own / "promptcot-sandbox" / name, (controller,)))
        created = []
        for group in groups:
            try:
                group.path.mkdir(parents=True, exist_ok=True)
                created.append(group)
            except OSError as exc:
                log.warning("no %s cgroup for the sandbox (%s)", "+".join(group.controllers), exc)
        missing = set(wanted) - {c for g in created for c in g.controllers}
        if missing:
            log.warning(
                "sandbox slots have no %s cgroup: relying on rlimits",
                " and no ".join(sorted(missing)),
            )
        return created

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def set_pids_max(self, n: int) -> None:
        if "pids" in self.controllers:
            (self.path / "pids.max").write_text(str(n))

    def set_memory_max(self, n_bytes: int) -> None:
        """Cap the memory of everything in the cgroup: process memory, tmpfs and shared memory
        pages, memfds, kernel memory. Swap is not allowed."""
        if "memory" not in self.controllers:
            return
        if (self.path / "memory.max").exists():  # v2
            (self.path / "memory.max").write_text(str(n_bytes))
            with contextlib.suppress(OSError):
                (self.path / "memory.swap.max").write_text("0")
            return
        files = [self.path / "memory.limit_in_bytes"]
        if (self.path / "memory.memsw.limit_in_bytes").exists():
            files.append(self.path / "memory.memsw.limit_in_bytes")  # memory + swap >= memory
        try:
            for file in files:
                file.write_text(str(n_bytes))
        except OSError:  # raising: memory+swap first, then memory
            for file in reversed(files):
                file.write_text(str(n_bytes))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()
        with contextlib.suppress(OSError):
            self.path.parent.rmdir()  # promptcot-sandbox, when no other slot uses it


@dataclass
class Slot:
    """One parallel run slot: its uid (None when not root: run as the caller), the lock that
    owns that uid machine-wide, and its cgroups (pids and memory, when available)."""

    index: int
    uid: int | None
    lock_fd: int | None = None
    cgroups: list[Cgroup] = field(default_factory=list)

    def cgroup_pids(self) -> list[int]:
        return [pid for group in self.cgroups for pid in group.pids()]

    def set_limits(self, processes: int, memory_bytes: int) -> None:
        for group in self.cgroups:
            group.set_pids_max(processes)
            group.set_memory_max(memory_bytes)


def claim_slot(
    index: int, lock_dir: Path, base_uid: int, uid_range: int, taken: set[int], use_cgroup: bool
) -> Slot | None:
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
            slot.cgroups = Cgroup.create_for_slot(f"uid-{uid}")
        return slot
    return None


def release_slot(slot: Slot) -> None:
    for group in slot.cgroups:
        group.remove()
    if slot.lock_fd is not None:
        os.close(slot.lock_fd)
        slot.lock_fd = None


def kill_slot_processes(
    slot: Slot, subreaper: bool, timeout: float = 5.0, keep: frozenset[int] = frozenset()
) -> bool:
    """SIGKILL everything in the slot's cgroups and under its uid (but ``keep``) until nothing
    remains; True when there was something to kill."""
    if slot.uid is None:
        return False  # shared uid: the pid namespace teardown is all we can rely on
    deadline = time.monotonic() + timeout
    found = False
    while True:
        if subreaper:
            reap_zombies(slot.uid)
        pids = set(processes_of_uid(slot.uid))
        pids.update(slot.cgroup_pids())
        pids -= keep
        if not pids:
            return found
        found = True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.error("sandbox uid %d still has processes %s", slot.uid, sorted(pids))
            return found
        time.sleep(0.005)
