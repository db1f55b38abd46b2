"""The journal of decisions: for every input id a stage decided, the output records it emitted.

Ids name units of work, and a model's sampling is not reproducible when a batch is made up
differently, so a redelivered input processed again could come out differently: a candidate
first rejected, then accepted under the same verdict id. The runtime therefore writes a stage's
outputs here *before* sending them, and on a redelivery re-emits what the journal holds instead
of deciding again: the first decision for an id is the decision.

One SQLite file per stage and namespace. Processes of one stage on one machine share it (SQLite
locks; the first writer of an id wins and every later writer reads the winner back). On a
cluster, give the stage's replicas one shared volume (docs/runtime.md).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from workers.backoff import Backoff

Outputs = list[list]  # per output: [topic short name, key, record JSON, headers]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    input_id TEXT PRIMARY KEY,
    outputs TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def _wal(db: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch to WAL, waiting for the other processes that open the same new file at once:
    SQLite answers "database is locked" at once there instead of waiting its busy timeout
    (tests/test_journal.py, two filter workers starting together)."""
    deadline, delays = time.monotonic() + wait_s, Backoff(0.01, 0.5)
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delays.next())


class Journal:
    def __init__(self, path: Path, retention_s: float = 30 * 86400, prune_every_s: float = 3600):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self.prune_every_s = prune_every_s  # a worker runs for weeks: prune as it goes too
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []  # one per thread, closed by close()
        self._pruned_at = 0.0
        with self._connect() as db:
            db.execute(_SCHEMA)
        self.prune()

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # Each thread uses its own connection; close() may close it from another thread.
            db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            _wal(db)
            db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a crash
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    def get(self, input_ids: Iterable[str]) -> dict[str, Outputs]:
        """The recorded outputs of the ids that were decided already."""
        ids = list(dict.fromkeys(input_ids))
        found: dict[str, Outputs] = {}
        db = self._connect()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                f"SELECT input_id, outputs FROM decisions WHERE input_id IN ({marks})", chunk
            )
            for input_id, outputs in rows:
                found[input_id] = json.loads(outputs)
        return found

    def record(self, decisions: dict[str, Outputs]) -> dict[str, Outputs]:
        """Record the decisions of ids not decided yet, in one transaction, and return what the
        journal holds for every id given: another process may have decided one first, and then
        its outputs are the decision."""
        if not decisions:
            return {}
        if time.monotonic() - self._pruned_at >= self.prune_every_s:
            self.prune()
        db = self._connect()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO decisions (input_id, outputs, created_at) VALUES (?, ?, ?)",
                [(i, json.dumps(outputs), now) for i, outputs in decisions.items()],
            )
            inserted = db.total_changes - before
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if inserted == len(decisions):  # nobody decided any of them first
            return dict(decisions)
        return self.get(decisions)

    def prune(self) -> int:
        """Forget decisions older than the retention (their inputs were committed long ago)."""
        self._pruned_at = time.monotonic()
        cur = self._connect().execute(
            "DELETE FROM decisions WHERE created_at < ?", (time.time() - self.retention_s,)
        )
        return cur.rowcount
