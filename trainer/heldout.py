"""What the trainer never trains on, and measures on: seeds and pairs held out by a hash of their
id, collected into fixed pools.

The split is a pure function of the id, so a held-out seed is held out in every window, by every
trainer replica and across restarts. The pool is the first ``capacity`` held-out items seen,
kept in a JSONL file next to the checkpoints: each window measures before and after training on
the same items, and once the pool is full every version is measured on the same set.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split by id: True for about ``fraction`` of all keys."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


class HeldoutPool:
    """Up to ``capacity`` held-out items (JSON objects) by key, first come first kept, persisted
    in ``path`` (append-only; a line torn by a crash is skipped)."""

    def __init__(self, path: Path, capacity: int = 32):
        self.path = Path(path)
        self.capacity = capacity
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row and len(self._items) < capacity:
                    self._items.setdefault(str(row["key"]), row["item"])

    def add(self, items: Iterable[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            new = []
            for key, item in items:
                if key not in self._items and len(self._items) < self.capacity:
                    self._items[key] = item
                    new.append({"key": key, "item": item})
            if new:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as out:
                    out.writelines(json.dumps(row) + "\n" for row in new)

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._items[k] for k in sorted(self._items)]
