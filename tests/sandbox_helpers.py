"""Shared pieces of the sandbox tests (tests/test_sandbox_*.py): fast limits, sandbox factories,
and the no-leftover checks every containment test ends with."""

from __future__ import annotations

import os
from collections.abc import Iterator

from verification.sandbox import Limits, Sandbox, SandboxSettings, processes_of_uid

IS_ROOT = os.geteuid() == 0
FAST = Limits(
    cpu_seconds=1,
    wall_seconds=2,
    memory_mb=256,
    max_processes=8,
    max_file_mb=8,
    max_output_bytes=1 << 20,
)
BACKENDS = ["bwrap", "unshare"]


def make_sandbox(backend: str, slots: int = 2, **settings: object) -> Sandbox:
    return Sandbox(SandboxSettings(backend=backend, slots=slots, limits=FAST, **settings))


def sandbox_fixture(backend: str, slots: int = 2, **settings: object) -> Iterator[Sandbox]:
    """Body of a sandbox fixture: yields it, then closes it and checks nothing remains."""
    sb = make_sandbox(backend, slots, **settings)
    try:
        yield sb
    finally:
        close_and_assert_nothing_remains(sb)


def assert_no_leftovers(sb: Sandbox) -> None:
    """Nothing of a solution survives it: every live process of a slot uid is that slot's idle
    zygote (the outer bwrap or unshare process and the harness), and nothing else."""
    if not IS_ROOT:
        return  # shared uid: the caller's own processes would match
    assert sb.leftovers() == {}, f"processes of sandbox uids remain: {sb.leftovers()}"
    zygotes = sb.zygote_pids()
    for uid in sb.uids:
        idle = zygotes.get(uid, frozenset())
        assert len(idle) <= 2, f"zygote of uid {uid} has processes {sorted(idle)}"
        assert set(processes_of_uid(uid)) <= idle, f"processes of sandbox uid {uid} remain"


def close_and_assert_nothing_remains(sb: Sandbox) -> None:
    """After close() not a single process of the slot uids remains, zygotes included."""
    uids = sb.uids
    sb.close()
    if IS_ROOT:
        for uid in uids:
            assert processes_of_uid(uid) == [], f"processes of sandbox uid {uid} remain"
