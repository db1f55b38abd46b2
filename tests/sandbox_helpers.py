"""Shared pieces of the sandbox tests (tests/test_sandbox_*.py): fast limits, sandbox factories,
and the no-leftover check every containment test ends with."""

from __future__ import annotations

import os

from workers.sandbox import Limits, Sandbox, SandboxSettings, processes_of_uid

IS_ROOT = os.geteuid() == 0
FAST = Limits(cpu_seconds=1, wall_seconds=2, memory_mb=256, max_processes=8, max_file_mb=8,
              max_output_bytes=1 << 20)
BACKENDS = ["bwrap", "unshare"]


def make_sandbox(backend: str, slots: int = 2, **settings: object) -> Sandbox:
    return Sandbox(SandboxSettings(backend=backend, slots=slots, limits=FAST, **settings))


def assert_no_leftovers(sb: Sandbox) -> None:
    """No live process of the sandbox uids remains."""
    if not IS_ROOT:
        return  # shared uid: the caller's own processes would match
    for uid in sb.uids:
        assert processes_of_uid(uid) == [], f"processes of sandbox uid {uid} remain"
