"""What goes into a sandboxed run and what comes out: the tests of a program, the result of one
run, the outcome of one test, and the error raised when no sandbox can run at all."""

from __future__ import annotations

from dataclasses import dataclass


class SandboxUnavailable(RuntimeError):
    """No sandbox backend can run here and running unsandboxed was not allowed."""


@dataclass(frozen=True)
class ProgramTest:
    """One stdin/stdout test of a program. ``output`` None: just run it, no verdict."""

    input: bytes
    output: bytes | None = None


@dataclass
class RunResult:
    """Outcome of one sandboxed program run."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None  # None when killed by a signal
    wall_time: float
    timed_out: bool
    killed: int | None  # signal number that ended it, if any
    output_truncated: bool
    backend: str


@dataclass
class TestOutcome:
    """Result of one test inside ``run_tests``."""

    __test__ = False  # not a pytest test class

    index: int
    stdout: bytes = b""
    stderr: bytes = b""  # tail only
    exit_code: int | None = None
    killed: int | None = None
    wall_time: float = 0.0
    timed_out: bool = False
    output_truncated: bool = False
    passed: bool | None = None  # None when the test had no expected output
    error: str = ""  # "" or: not_run (stopped after a failure), sandbox_failed, tampered
    backend: str = ""

    @property
    def ok(self) -> bool:
        """Ran to a clean exit within limits (regardless of the output)."""
        return (
            not self.error
            and not self.timed_out
            and self.killed is None
            and self.exit_code == 0
            and not self.output_truncated
        )
