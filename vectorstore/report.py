"""A 2-D map of seed vs synthetic problems (PCA or t-SNE of their embeddings) as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # headless workers: never pick an interactive backend
import matplotlib.pyplot as plt
import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from vectorstore.embedder import Embedder


def project_2d(
    vectors: np.ndarray, method: Literal["pca", "tsne"] = "pca", seed: int = 0
) -> np.ndarray:
    if len(vectors) < 3 or method == "pca":
        components = min(2, len(vectors), vectors.shape[1])
        points = PCA(n_components=components, random_state=seed).fit_transform(vectors)
        return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    perplexity = min(30.0, (len(vectors) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        vectors
    )


def write_map(
    seed_texts: Sequence[str],
    synthetic_texts: Sequence[str],
    out_png: str | Path,
    *,
    embedder: Embedder | None = None,
    method: Literal["pca", "tsne"] = "pca",
    title: str = "seed vs synthetic problems",
) -> Path:
    """Embed both sets, project them together, scatter them; returns the PNG path."""
    seed_texts = [t for t in seed_texts if t.strip()]
    synthetic_texts = [t for t in synthetic_texts if t.strip()]
    if not seed_texts and not synthetic_texts:
        raise ValueError("nothing to plot")
    embedder = embedder or Embedder()
    vectors = embedder.embed([*seed_texts, *synthetic_texts])
    points = project_2d(vectors, method)
    seeds, synthetic = points[: len(seed_texts)], points[len(seed_texts) :]

    figure, axes = plt.subplots(figsize=(7, 6), dpi=100)
    axes.scatter(seeds[:, 0], seeds[:, 1], s=12, alpha=0.6, label=f"seed ({len(seeds)})")
    axes.scatter(
        synthetic[:, 0],
        synthetic[:, 1],
        s=12,
        alpha=0.6,
        marker="x",
        label=f"synthetic ({len(synthetic)})",
    )
    axes.set_title(f"{title} ({method.upper()})")
    axes.legend()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out
