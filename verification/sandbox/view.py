"""What the sandbox sees of the host's filesystem: the interpreter and nothing else.

``interpreter_view`` asks the interpreter itself (a trusted host binary, run once per Sandbox)
where it lives: its executable, the directories on its ``sys.path`` (with the configured
``python_args``: ``-S`` keeps site-packages out), and every file it maps after importing each of
its extension modules (the shared libraries, locale and gconv data). Those paths are bound
read-only at the same place inside the sandbox, with the symlinks that lead to them (``/lib64``
-> ``usr/lib64``, a library's soname link ``libz.so.1`` -> ``libz.so.1.2.13``) recreated. No
/etc, /home, /root, /work, /var, the host's /tmp or /dev/shm: see ``docs/sandbox.md``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from verification.sandbox.runs import SandboxUnavailable

# Run by the interpreter on the host: import every extension module, then list what is mapped.
_PROBE = r"""
import json, os, sys, sysconfig, warnings
warnings.simplefilter("ignore")
dynload = os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")
names = os.listdir(dynload) if os.path.isdir(dynload) else []
for name in sorted(names):
    module = name.split(".")[0]
    if module in ("readline", "_tkinter", "antigravity", "this"):
        continue  # side effects on import (terminal escapes, a browser, a poem)
    try:
        __import__(module)
    except Exception:
        pass
mapped = set()
with open("/proc/self/maps") as maps:
    for line in maps:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            mapped.add(parts[5].strip())
print(json.dumps({"executable": os.path.realpath(sys.executable), "path": sys.path,
                  "mapped": sorted(mapped)}))
"""

# Device nodes a Python program may legitimately open; bound from the host by the unshare kind
# (bwrap's --dev creates the same set).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class InterpreterView:
    """Read-only host paths the sandbox sees, and the symlinks that lead to them."""

    python: str  # real path of the interpreter, as the sandbox runs it
    ro_paths: tuple[str, ...]  # files and directories, bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (path of the link, its target) recreated inside

    def bwrap_args(self) -> list[str]:
        args: list[str] = []
        for path in self.ro_paths:
            args += ["--ro-bind", path, path]
        for link, target in self.symlinks:
            args += ["--symlink", target, link]
        return args

    def spec(self) -> dict[str, object]:
        """The same view for the harness (the unshare kind builds it itself)."""
        return {"ro_paths": list(self.ro_paths), "symlinks": [list(s) for s in self.symlinks]}


def _elf_interpreter(path: str) -> str | None:
    """The dynamic loader named in an ELF executable's PT_INTERP header (None for static or
    non-ELF files)."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF":
                return None
            is64, order = header[4] == 2, "little" if header[5] == 1 else "big"

            def number(at: int, size: int) -> int:
                return int.from_bytes(header[at : at + size], order)

            phoff = number(0x20, 8) if is64 else number(0x1C, 4)
            phentsize = number(0x36, 2) if is64 else number(0x2A, 2)
            phnum = number(0x38, 2) if is64 else number(0x2C, 2)
            for k in range(phnum):
                f.seek(phoff + k * phentsize)
                entry = f.read(phentsize)
                if int.from_bytes(entry[0:4], order) != 3:  # PT_INTERP
                    continue
                offset = int.from_bytes(entry[8:16] if is64 else entry[4:8], order)
                size = int.from_bytes(entry[32:40] if is64 else entry[16:20], order)
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    except OSError:
        return None
    return None


def _resolve(path: str) -> tuple[list[tuple[str, str]], str]:
    """Follow ``path`` component by component: the symlinks met on the way (link, target) and
    the real path at the end."""
    links: list[tuple[str, str]] = []
    pending = [p for p in path.split("/") if p]
    current = "/"
    for _ in range(64):  # like the kernel's symlink limit
        if not pending:
            return links, current
        candidate = os.path.join(current, pending.pop(0))
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links.append((candidate, target))
            base = "/" if target.startswith("/") else current
            pending = [
                p for p in os.path.normpath(os.path.join(base, target)).split("/") if p
            ] + pending
            current = "/"
        else:
            current = candidate
    raise SandboxUnavailable(f"too many symlinks resolving {path}")


def _soname_links(library: str) -> Iterable[str]:
    """Symlinks in the library's directory that point at it (``libz.so.1`` for
    ``libz.so.1.2.13``): the dynamic loader looks libraries up by those names."""
    directory = os.path.dirname(library)
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return [
        os.path.join(directory, e)
        for e in entries
        if os.path.islink(os.path.join(directory, e))
        and os.path.realpath(os.path.join(directory, e)) == library
    ]


def _covered(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


@functools.lru_cache(maxsize=8)
def interpreter_view(
    python: str, python_args: tuple[str, ...] = ("-S",), extra_ro_paths: tuple[str, ...] = ()
) -> InterpreterView:
    """The paths ``python`` (started with ``python_args``) needs, plus ``extra_ro_paths``."""
    try:
        probe = subprocess.run(
            [python, *python_args, "-c", _PROBE],
            capture_output=True,
            timeout=60,
            check=True,
            env={"LANG": "C.UTF-8"},
            cwd="/",
        )
        found = json.loads(probe.stdout.decode().strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        raise SandboxUnavailable(f"cannot probe the interpreter {python}: {exc}") from exc
    executable = found["executable"]
    dirs = sorted(
        {os.path.realpath(p) for p in found["path"] if p and os.path.isabs(p) and os.path.isdir(p)}
    )
    dirs = [d for d in dirs if not _covered(d, [o for o in dirs if o != d])]  # outermost only
    wanted = {executable, *found["mapped"], *extra_ro_paths}
    loader = _elf_interpreter(executable)
    if loader:
        wanted.add(loader)
    for mapped in found["mapped"]:
        wanted.update(_soname_links(mapped))
    ro_paths = set(dirs)
    symlinks: dict[str, str] = {}
    for path in sorted(wanted):
        links, real = _resolve(path)
        symlinks.update(links)
        if os.path.exists(real) and not _covered(real, dirs):
            ro_paths.add(real)
    ro = tuple(sorted(p for p in ro_paths if not _covered(p, ro_paths - {p})))
    # a link inside a bound directory already exists there
    links = tuple(sorted((k, v) for k, v in symlinks.items() if not _covered(k, ro)))
    return InterpreterView(python=executable, ro_paths=ro, symlinks=links)
