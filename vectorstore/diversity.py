"""Diversity of a window of accepted problems: plain functions over unit embedding vectors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def mean_pairwise_distance(vectors: np.ndarray) -> float:
    """Mean cosine distance over distinct pairs; 0.0 for fewer than two problems."""
    unit = _unit(vectors)
    n = len(unit)
    if n < 2:
        return 0.0
    # Sum of all pair similarities from the sum vector: O(n d) rather than an n x n matrix.
    total = unit.sum(axis=0)
    pair_sum = (float(total @ total) - float(np.sum(unit * unit))) / 2
    return 1.0 - pair_sum / (n * (n - 1) / 2)


def centroid_distance(seed_vectors: np.ndarray, synthetic_vectors: np.ndarray) -> float:
    """Cosine distance between the seed and the synthetic centroids (0 = same centre)."""
    if len(seed_vectors) == 0 or len(synthetic_vectors) == 0:
        return 0.0
    a = _unit(seed_vectors).mean(axis=0)
    b = _unit(synthetic_vectors).mean(axis=0)
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(a @ b) / denominator if denominator else 0.0


def mean_nearest_seed_distance(seed_vectors: np.ndarray, synthetic_vectors: np.ndarray) -> float:
    """Mean over synthetic problems of the cosine distance to their nearest seed problem."""
    if len(seed_vectors) == 0 or len(synthetic_vectors) == 0:
        return 0.0
    similarities = _unit(synthetic_vectors) @ _unit(seed_vectors).T
    return float(1.0 - similarities.max(axis=1).mean())


def concept_coverage(used_concept_sets: Iterable[Iterable[str]], pool: Iterable[str]) -> float:
    """Fraction of the concept pool used by at least one problem of the window."""
    pool_set = {c.strip().casefold() for c in pool}
    if not pool_set:
        return 0.0
    used = {c.strip().casefold() for concepts in used_concept_sets for c in concepts}
    return len(used & pool_set) / len(pool_set)
