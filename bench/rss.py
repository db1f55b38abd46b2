"""Resident memory of a process and its descendants over time, read from /proc (Linux).

``TreeSampler(pid)`` samples every ``interval_s`` on a thread of its own: the resident memory of
the process and of each descendant (the embedded broker, its S3 server, sandboxes), each named
by what it runs: RSS, its anonymous and file-backed parts, and PSS (streams/memory.py says what
each counts). ``peak`` is the sample with the largest RSS total. bench/memory.py and
bench/loop.py use it on `promptcot up`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.memory import proportional_bytes, resident_bytes, resident_split


def _stat(pid: str) -> tuple[str, int] | None:
    """(comm, parent pid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces: split after the last ')'.
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[1])


def descendants(root: int) -> list[int]:
    """The process ids under ``root`` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(entry)
            if found is not None:
                parents.setdefault(found[1], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_name(pid: int) -> str:
    """What a process runs, short: the program, or for Python the module or script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    argv = [a.decode(errors="replace") for a in argv if a]
    if not argv:
        found = _stat(str(pid))
        return found[0] if found else "?"
    program = os.path.basename(argv[0])
    if program.startswith("python"):
        rest = argv[1:]
        if "-m" in rest and rest.index("-m") + 1 < len(rest):
            module = rest[rest.index("-m") + 1]
            after = rest[rest.index("-m") + 2 :]
            return f"python -m {module}" + (f" {after[0]}" if after else "")
        if "-c" in rest:
            return "python -c"
        return f"python {os.path.basename(rest[0])}" if rest else "python"
    return program


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    # process name -> {"rss", "anon", "file", "pss"} bytes (processes of one name add up)
    procs: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        """RSS of the tree: what `ps` and the issue's figures add up."""
        return sum(p.get("rss", 0) for p in self.procs.values())

    @property
    def total_pss(self) -> int:
        """PSS of the tree: shared pages (a model file mapped twice) counted once."""
        return sum(p.get("pss", 0) for p in self.procs.values())


def measure_process(pid: int) -> dict[str, int] | None:
    rss = resident_bytes(pid)
    if rss is None:
        return None
    out = {"rss": rss, **(resident_split(pid) or {})}
    pss = proportional_bytes(pid)
    if pss is not None:
        out["pss"] = pss
    return out


@dataclass
class TreeSampler:
    pid: int
    interval_s: float = 2.0
    root_name: str = "promptcot up"
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.started = time.monotonic()

    def start(self) -> TreeSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            if sample is not None:
                self.samples.append(sample)
            self._stop.wait(self.interval_s)

    def sample(self) -> Sample | None:
        own = measure_process(self.pid)
        if own is None:
            return None
        procs = {self.root_name: own}
        for child in descendants(self.pid):
            found = measure_process(child)
            if found:
                name = process_name(child)
                into = procs.setdefault(name, {})
                for kind, value in found.items():
                    into[kind] = into.get(kind, 0) + value
        return Sample(time.monotonic() - self.started, procs)

    @property
    def peak(self) -> Sample | None:
        return max(self.samples, key=lambda s: s.total, default=None)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"t": round(s.t, 2), "procs": s.procs} for s in self.samples]


class PeakRSS:
    """The highest resident set size of this process (bytes) while a block runs, sampled from
    a thread every ``every_s``: ``with PeakRSS() as rss: ...`` then ``rss.start``, ``rss.peak``."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self.start = self.peak = resident_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, resident_bytes() or 0)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = resident_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes() or 0)
