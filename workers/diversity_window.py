"""Rolling diversity of the last N accepted problems, for the live DIVERSITY gauges.

The filter stage adds each batch's accepted vectors (unit embeddings from the dedup screen) and
their concept lists, then publishes ``measures()``:

- ``mean_pairwise_distance``: mean cosine distance between the window's problems (0 = all alike).
- ``seed_centroid_distance``: cosine distance between the window's centroid and the centroid of a
  fixed seed sample (drift away from / towards the seed distribution).
- ``concept_coverage``: share of the concept pool named by at least one problem of the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from vectorstore.diversity import centroid_distance, concept_coverage, mean_pairwise_distance
from workers.concepts import ConceptPool


def pool_concepts(pool: ConceptPool | Iterable[str] | None) -> list[str]:
    """All concept names of a pool (every domain), or the given names."""
    if pool is None:
        return []
    if isinstance(pool, ConceptPool):
        return [c for dp in pool.domains.values() for c in dp.concepts]
    return list(pool)


class DiversityWindow:
    def __init__(self, size: int = 256):
        if size < 1:
            raise ValueError("window size must be >= 1")
        self.size = size
        self._vectors: deque[np.ndarray] = deque(maxlen=size)
        self._concepts: deque[list[str]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._vectors)

    def add(
        self, vectors: np.ndarray | Sequence[np.ndarray], concept_lists: Sequence[Sequence[str]]
    ) -> None:
        """Append one batch (oldest problems fall out past ``size``)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.size == 0 and not concept_lists:
            return
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        for vector, concepts in zip(vectors, concept_lists, strict=True):
            self._vectors.append(vector)
            self._concepts.append(list(concepts))

    @property
    def vectors(self) -> np.ndarray:
        return np.stack(self._vectors) if self._vectors else np.zeros((0, 0), dtype=np.float32)

    def measures(
        self, seed_centroid: np.ndarray | None, pool: ConceptPool | Iterable[str] | None
    ) -> dict[str, float]:
        vectors = self.vectors
        out = {
            "mean_pairwise_distance": mean_pairwise_distance(vectors) if len(vectors) else 0.0,
            "concept_coverage": concept_coverage(self._concepts, pool_concepts(pool)),
        }
        if seed_centroid is not None and len(vectors):
            out["seed_centroid_distance"] = centroid_distance(
                np.asarray(seed_centroid, dtype=np.float32).reshape(1, -1), vectors
            )
        return out
