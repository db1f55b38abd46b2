"""A gate for tests that act mid-stream (a kill, a SIGTERM): the test holds a worker at a chosen
point of its work and acts while it is held, so a fast machine cannot finish first and a loaded
one gives the same result. A test facility: the product never reads these variables.

A held call waits until the gate file exists (the test creates it to open the gate, or never
does); it says so on stdout first (``HOLDING``), which a test waits for before it acts.

In a worker process, from the environment (``install_from_env``):

- ``TEST_GATE_FILE``: the file whose creation opens the gate;
- ``TEST_GATE_AT``: what to hold, ``module:function`` or ``module:Class.method``;
- ``TEST_GATE_AFTER``: calls let through before the gate holds (default 0).
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from pathlib import Path

HOLDING = "test gate: holding"


def hold(target: str, gate: Path, after: int = 0) -> None:
    """Replace ``target`` by a version whose calls after the first ``after`` wait for ``gate``."""
    module, _, qualname = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    lock = threading.Lock()
    calls = 0

    @functools.wraps(original)
    def gated(*args, **kwargs):
        nonlocal calls
        with lock:
            calls += 1
            number = calls
        if number > after and not gate.exists():
            print(f"{HOLDING} call {number} of {target} until {gate} exists", flush=True)
            while not gate.exists():  # polls a file the test creates: no timing involved
                time.sleep(0.02)
        return original(*args, **kwargs)

    setattr(owner, name, gated)


def install_from_env() -> None:
    """``hold`` as the ``TEST_GATE_*`` variables say; nothing when they are not set."""
    if os.environ.get("TEST_GATE_FILE") and os.environ.get("TEST_GATE_AT"):
        hold(
            os.environ["TEST_GATE_AT"],
            Path(os.environ["TEST_GATE_FILE"]),
            int(os.environ.get("TEST_GATE_AFTER", "0")),
        )


def gate_env(gate: Path, at: str, after: int = 0) -> dict[str, str]:
    """The variables that hold ``at`` after ``after`` calls until ``gate`` exists."""
    return {"TEST_GATE_FILE": str(gate), "TEST_GATE_AT": at, "TEST_GATE_AFTER": str(after)}


def held(log: Path) -> bool:
    """Whether the worker logging to ``log`` is held at its gate."""
    return log.exists() and HOLDING in log.read_text(errors="replace")
