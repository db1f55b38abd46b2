"""Run untrusted Python programs (model-written solutions) in a sandbox.

Modules, one concern each:

- ``settings``: ``SandboxSettings``, ``Limits``, ``IsolationKind``.
- ``runs``: what goes in and comes out (``ProgramTest``, ``RunResult``, ``TestOutcome``) and
  ``SandboxUnavailable``.
- ``isolation``: host-side isolation of slots (uids, lock files, cgroups, reaping, listing).
- ``harness``: the program that runs inside the sandbox (its source is sent in; the host imports
  ``normalize_output`` from it).
- ``runner``: the ``Sandbox`` class (slot pool, command chain, ``run``/``run_tests``).

How a run is contained, the measured facts it relies on, and the threat model: docs/sandbox.md.
"""

from verification.sandbox.harness import normalize_output
from verification.sandbox.isolation import processes_of_uid
from verification.sandbox.runner import Sandbox, output_digest
from verification.sandbox.runs import ProgramTest, RunResult, SandboxUnavailable, TestOutcome
from verification.sandbox.settings import IsolationKind, Limits, SandboxSettings

__all__ = [
    "IsolationKind",
    "Limits",
    "ProgramTest",
    "RunResult",
    "Sandbox",
    "SandboxSettings",
    "SandboxUnavailable",
    "TestOutcome",
    "normalize_output",
    "output_digest",
    "processes_of_uid",
]
