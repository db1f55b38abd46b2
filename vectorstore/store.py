"""LanceDB table of accepted problems: batched writes, ANN index past a size threshold,
periodic compaction, batched nearest-neighbour lookups.

Single writer: concurrent upserts/check-then-insert on LanceDB let duplicates through
(docs/vectorstore.md, "Scaling out"), so only the dedup owner calls ``add``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import BTree, HnswPq, HnswSq, IvfFlat, IvfPq

from vectorstore.settings import StoreSettings

log = logging.getLogger(__name__)

Neighbor = tuple[str, float]  # (problem id, cosine similarity)

_VECTOR_INDEX = {"IVF_HNSW_SQ": HnswSq, "IVF_HNSW_PQ": HnswPq, "IVF_PQ": IvfPq, "IVF_FLAT": IvfFlat}


@dataclass(frozen=True)
class StoredProblem:
    id: str
    text: str
    text_hash: str
    domain: str
    vector: np.ndarray  # unit float32
    metadata: dict[str, Any] = field(default_factory=dict)  # lineage: parents, model versions...
    created_at: datetime | None = None  # None: now


def problem_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("text", pa.string()),
            pa.field("text_hash", pa.string()),
            pa.field("domain", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            pa.field("metadata", pa.string()),  # JSON
            pa.field("created_at", pa.timestamp("us", tz="UTC")),
        ]
    )


class ProblemStore:
    def __init__(self, dim: int, settings: StoreSettings | None = None):
        self.settings = settings or StoreSettings()
        self.dim = dim
        self._db = lancedb.connect(self.settings.uri)
        self._table = self._create_or_open()
        self._writes = 0  # add() calls since the last optimize()
        self._indexed_rows = self._vector_index_rows()  # rows when the index was last trained
        self.optimizations = 0

    def _create_or_open(self, tries: int = 8) -> Any:
        """The table, created if it is not there. Workers starting together on an empty folder
        race to create it: exist_ok lets the losers open the winner's (a list-then-create check
        failed one of them), and a creation that Lance preempted ("Retryable commit conflict")
        is tried again, after a short pause, until it opens the table another process made."""

        def create() -> Any:
            return self._db.create_table(
                self.settings.table, schema=problem_schema(self.dim), exist_ok=True
            )

        delay = 0.02
        for _ in range(tries - 1):
            try:
                return create()
            except RuntimeError as exc:
                if "Retryable commit conflict" not in str(exc):
                    raise
            time.sleep(delay)
            delay *= 2
        return create()  # the last try: its error is the caller's

    # Writes ----------------------------------------------------------------------------------

    def add(self, rows: Sequence[StoredProblem]) -> None:
        """One batched append (one table version); compaction and indexing on schedule."""
        if not rows:
            return
        now = datetime.now(UTC)
        vectors = np.asarray([r.vector for r in rows], dtype=np.float32).reshape(-1, self.dim)
        batch = pa.table(
            {
                "id": [r.id for r in rows],
                "text": [r.text for r in rows],
                "text_hash": [r.text_hash for r in rows],
                "domain": [r.domain for r in rows],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.dim),
                "metadata": [json.dumps(r.metadata, sort_keys=True, default=str) for r in rows],
                "created_at": [r.created_at or now for r in rows],
            },
            schema=problem_schema(self.dim),
        )
        self._table.add(batch)
        self._writes += 1
        if self._writes >= self.settings.optimize_every_writes:
            self.optimize()
        self._maybe_build_index()

    def optimize(self) -> None:
        """Compact small fragments and fold new rows into existing indices."""
        self._table.optimize(cleanup_older_than=timedelta(hours=1))
        self._writes = 0
        self.optimizations += 1

    def _maybe_build_index(self) -> None:
        rows = self.count()
        if rows < self.settings.index_min_rows:
            return
        grown = (
            self._indexed_rows and rows >= self._indexed_rows * self.settings.reindex_growth_factor
        )
        if self._indexed_rows and not grown:
            return
        log.info("building %s index over %d rows", self.settings.index_type, rows)
        config = _VECTOR_INDEX[self.settings.index_type](distance_type="cosine")
        self._table.create_index("vector", config=config, replace=True)
        # Exact-duplicate lookups filter on text_hash; a scalar index keeps them O(log n).
        self._table.create_index("text_hash", config=BTree(), replace=True)
        self._indexed_rows = rows

    def _vector_index_rows(self) -> int:
        for index in self._table.list_indices():
            if "vector" in index.columns:
                return self.count()
        return 0

    # Reads -----------------------------------------------------------------------------------

    @property
    def has_vector_index(self) -> bool:
        return self._indexed_rows > 0

    def count(self) -> int:
        return self._table.count_rows()

    def nearest(self, vectors: np.ndarray, k: int = 1) -> list[list[Neighbor]]:
        """Up to k (id, cosine similarity) per query vector, best first, in ONE search call."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        results: list[list[Neighbor]] = [[] for _ in range(len(queries))]
        if len(queries) == 0:  # an empty table simply returns no rows
            return results
        query = (
            self._table.search(queries.tolist() if len(queries) > 1 else queries[0])
            .distance_type("cosine")
            .limit(k)
            .select(["id", "_distance"])
        )
        if self.has_vector_index:
            query = query.nprobes(self.settings.nprobes).ef(self.settings.ef)
            if self.settings.refine_factor:
                query = query.refine_factor(self.settings.refine_factor)
        found = query.to_arrow()
        ids = found["id"].to_pylist()
        distances = found["_distance"].to_pylist()
        positions = (
            found["query_index"].to_pylist()
            if "query_index" in found.column_names
            else [0] * len(ids)
        )
        for position, problem_id, distance in zip(positions, ids, distances, strict=True):
            results[position].append((problem_id, 1.0 - float(distance)))
        for neighbors in results:
            neighbors.sort(key=lambda n: -n[1])
        return results

    def ids_by_hash(self, hashes: Sequence[str]) -> dict[str, str]:
        """text_hash -> stored id for the hashes already present (one filtered scan)."""
        # Only hex digests (our own hash_key) are looked up: safe to inline in the SQL filter.
        wanted = sorted({h for h in hashes if h and all(c in "0123456789abcdef" for c in h)})
        if not wanted:
            return {}
        quoted = ", ".join(f"'{h}'" for h in wanted)
        found = (
            self._table.search()
            .where(f"text_hash IN ({quoted})")
            .select(["id", "text_hash"])
            .limit(len(wanted) * 4 + 10)
            .to_arrow()
        )
        return dict(zip(found["text_hash"].to_pylist(), found["id"].to_pylist(), strict=True))

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """The ids of ``ids`` that are stored already (one filtered scan)."""
        wanted = sorted({i for i in ids if i})
        if not wanted:
            return set()
        quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in wanted)
        found = (
            self._table.search()
            .where(f"id IN ({quoted})")
            .select(["id"])
            .limit(len(wanted) * 4 + 10)
            .to_arrow()
        )
        return set(found["id"].to_pylist())

    def rows(
        self, columns: Sequence[str] = ("id", "text", "domain", "vector", "metadata")
    ) -> list[dict[str, Any]]:
        """Every stored row (a full scan, for reports); metadata decoded, vectors as float32."""
        found = self._table.to_arrow().select(list(columns)).to_pylist()
        for row in found:
            if "metadata" in row:
                row["metadata"] = json.loads(row["metadata"] or "{}")
            if "vector" in row:
                row["vector"] = np.asarray(row["vector"], dtype=np.float32)
        return found

    def get(self, problem_id: str) -> dict[str, Any] | None:
        safe = problem_id.replace("'", "''")
        rows = self._table.search().where(f"id = '{safe}'").limit(1).to_list()
        if not rows:
            return None
        row = rows[0]
        row["metadata"] = json.loads(row["metadata"] or "{}")
        return row
