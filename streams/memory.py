"""What this process holds in memory: the figures behind its memory gauges (streams/metrics.py)
and the memory bench (bench/memory.py).

- Resident bytes (``/proc/self/status``: anonymous, file-backed, shared memory), and the C
  allocator's own view (glibc ``mallinfo2``):
  bytes handed out, bytes freed but kept by the allocator, bytes in mmapped chunks. A resident
  size that climbs while the bytes in use stay flat is the allocator keeping what was freed,
  not a leak.
- Tensor bytes by component. Objects that hold models register with ``hold`` (weakly: a holder
  that goes away drops out) and list what they hold with ``memory_components()``: (label,
  torch module / optimizer / tensors). Storages are deduplicated by data pointer: each is counted
  once, under the first component that holds it, holders that share their tensors (``shares =
  True``: the shared base copies of llm/shared_base.py) first; what a component aliases from
  another is its ``shared`` bytes, what it alone holds its ``own`` bytes. The sum of the ``own``
  bytes is what the tensors cost the process.

No torch import here: tensors are read by duck typing, so a process without models pays nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

_holders: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def hold(holder: Any) -> None:
    """Count what ``holder.memory_components()`` lists in this process's account, for as long
    as the holder lives."""
    with _lock:
        _holders.add(holder)


@dataclass(frozen=True)
class ComponentBytes:
    component: str
    own: int  # storages counted here first
    shared: int  # storages counted under another component (a shared base, usually)

    @property
    def total(self) -> int:
        return self.own + self.shared


def tensor_account() -> list[ComponentBytes]:
    """Tensor bytes per component label of every registered holder, shared holders first
    (module docstring)."""
    with _lock:
        holders = list(_holders)
    holders.sort(key=lambda h: not getattr(h, "shares", False))
    return account([c for holder in holders for c in _components(holder)])


def account(components: Iterable[tuple[str, Any]]) -> list[ComponentBytes]:
    """Tensor bytes per label of (label, module / optimizer / tensors) pairs, in order: a
    storage is ``own`` bytes of the first component that holds it and ``shared`` bytes of the
    others. Components of one label add up. A component whose modules change while they are
    read (an adapter added in another thread) is read again."""
    seen: set[tuple[str, int]] = set()
    own: dict[str, int] = {}
    shared: dict[str, int] = {}
    for label, obj in components:
        storages: dict[tuple[str, int], int] = {}
        for attempt in range(3):
            try:
                storages = dict(_storages(obj))
                break
            except RuntimeError:  # "dictionary changed size during iteration"
                if attempt == 2:
                    storages = {}
        own.setdefault(label, 0)
        shared.setdefault(label, 0)
        for key, nbytes in storages.items():
            if key in seen:
                shared[label] += nbytes
            else:
                seen.add(key)
                own[label] += nbytes
    return [ComponentBytes(label, own[label], shared[label]) for label in own]


def _components(holder: Any) -> list[tuple[str, Any]]:
    try:
        return list(holder.memory_components())
    except Exception:  # noqa: BLE001  (a holder half torn down: it holds nothing worth a crash)
        return []


def _storages(obj: Any) -> Iterator[tuple[tuple[str, int], int]]:
    """((device, data pointer), bytes) of every storage behind a module, an optimizer or an
    iterable of tensors."""
    for tensor in _tensors(obj):
        storage = tensor.untyped_storage()
        yield (str(tensor.device), storage.data_ptr()), storage.nbytes()


def _tensors(obj: Any) -> Iterator[Any]:
    if hasattr(obj, "named_parameters") and hasattr(obj, "buffers"):  # a torch module
        for param in obj.parameters():
            yield param
            if param.grad is not None:
                yield param.grad
        yield from obj.buffers()
    elif hasattr(obj, "param_groups") and hasattr(obj, "state"):  # a torch optimizer
        for state in list(obj.state.values()):
            yield from (v for v in state.values() if _is_tensor(v))
    elif _is_tensor(obj):
        yield obj
    elif isinstance(obj, Iterable):
        for item in obj:
            yield from _tensors(item)


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "untyped_storage") and hasattr(value, "device")


# -- the process ----------------------------------------------------------------------------------


def resident_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process (None: not on Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def resident_split(pid: int | str = "self") -> dict[str, int] | None:
    """The resident set by kind: ``anon`` (the heap, tensors made at run time, pages a process
    wrote), ``file`` (mapped files: model weights transformers maps from their safetensors file
    stay file pages until written, and are shared with the page cache and with every other
    mapping of the file), ``shmem``. None: not on Linux, or the process is gone."""
    keys = {"RssAnon:": "anon", "RssFile:": "file", "RssShmem:": "shmem"}
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()  # "RssAnon:\t  1234 kB"
                if parts and parts[0] in keys:
                    out[keys[parts[0]]] = int(parts[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out or None


def proportional_bytes(pid: int | str = "self") -> int | None:
    """Proportional set size (PSS): each resident page divided by the number of mappings that
    share it, so a file mapped twice (or by two processes) counts once in all. What the
    process costs the machine, where RSS counts a shared page in every mapping."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        libc = ctypes.CDLL(path)
        libc.mallinfo2.restype = _Mallinfo2
        libc.malloc_trim.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not glibc (musl, macOS), or a glibc before 2.33
        return None


_LIBC = _libc()


def malloc_bytes() -> dict[str, int] | None:
    """glibc's account of the C heap over all arenas: ``in_use`` (handed out, mmapped chunks
    included), ``free`` (freed but still held by the arenas: resident until trimmed or reused),
    ``mmapped`` (large chunks, returned to the system when freed). None without glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks, "mmapped": info.hblkhd}


def trim() -> bool:
    """Give the arenas' free memory back to the system (glibc ``malloc_trim``); False when
    nothing was returned or there is no glibc."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


def release() -> None:
    """After work that allocated and freed a lot (a training window, new weights loaded, an
    eval): collect the garbage cycles that still hold tensors, then give the allocator's free
    memory back. glibc keeps what a thread freed in that thread's arena, and above its dynamic
    mmap threshold (up to 32 MB) even large tensors come from arenas: measured in
    `promptcot up`, gigabytes stay resident as free heap after a training window otherwise
    (docs/models.md, "Memory")."""
    import gc

    gc.collect()
    trim()
