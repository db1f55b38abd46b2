"""`promptcot report`: a 2-D map of seed vs accepted synthetic problems and summary diversity
measures (vectorstore.diversity), as a JSON-able dict.

Synthetic problems come from the Parquet sink (``<sink.output_dir>/problems``: verified problems,
the product); when it is empty, from the LanceDB problem store (problems that passed the filter,
not necessarily verified; ``source`` in the summary says which). Seeds: the first GSM8K train
questions, plus Codeforces statements when there are code problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vectorstore.diversity import (
    centroid_distance,
    concept_coverage,
    mean_nearest_seed_distance,
    mean_pairwise_distance,
)
from vectorstore.embedder import Embedder
from vectorstore.report import write_map
from workers.concepts import load_pool
from workers.seeds import load_seeds
from workers.stages.sink import read_problems

if TYPE_CHECKING:
    from promptcot.settings import Settings


class _CachedEmbedder:
    """Embeds each distinct text once (measures and the map share vectors); store rows bring
    their own vectors."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.dim = embedder.dim
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.embedder.embed(missing), strict=True))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])


def _from_sink(settings: Settings) -> tuple[list[dict[str, Any]], str]:
    directory = Path(settings.sink.output_dir) / "problems"
    rows = read_problems(directory) if directory.is_dir() else []
    problems = [
        {
            "text": r["problem"] or "",
            "domain": r["domain"],
            "concepts": list(r.get("concepts") or []),
            "created_at": r.get("created_at") or 0.0,
        }
        for r in rows
    ]
    return problems, str(directory)


def _from_store(settings: Settings, embedder: _CachedEmbedder) -> tuple[list[dict[str, Any]], str]:
    import lancedb

    from vectorstore.store import ProblemStore

    cfg = settings.vectorstore.store
    if "://" not in cfg.uri and not Path(cfg.uri).exists():
        return [], cfg.uri
    if cfg.table not in lancedb.connect(cfg.uri).list_tables().tables:
        return [], cfg.uri
    problems = []
    for row in ProblemStore(embedder.dim, cfg).rows(
        ("text", "domain", "vector", "metadata", "created_at")
    ):
        embedder.cache.setdefault(row["text"] or "", row["vector"])  # no need to embed again
        created = row.get("created_at")
        problems.append(
            {
                "text": row["text"] or "",
                "domain": row["domain"],
                "concepts": list(row["metadata"].get("concepts") or []),
                "created_at": created.timestamp() if created is not None else 0.0,
            }
        )
    return problems, cfg.uri


def load_synthetic(
    settings: Settings, embedder: _CachedEmbedder
) -> tuple[list[dict[str, Any]], str, str]:
    """(problems, source, location): the sink's problems, or the store's when the sink is empty."""
    problems, location = _from_sink(settings)
    if problems:
        return problems, "sink", location
    stored, store_location = _from_store(settings, embedder)
    if stored:
        return stored, "store", store_location
    raise ValueError(
        "no accepted synthetic problems to report on: the sink folder "
        f"{location} has no problems and the vector store {store_location} is empty or missing. "
        "Run the factory (`promptcot up`) until problems are accepted, or point --config at the "
        "settings of the run whose output you want (sink.output_dir, vectorstore.store.uri)."
    )


def _measures(seed_vectors: np.ndarray, synthetic_vectors: np.ndarray) -> dict[str, float]:
    return {
        "mean_pairwise_distance": round(mean_pairwise_distance(synthetic_vectors), 4),
        "centroid_distance": round(centroid_distance(seed_vectors, synthetic_vectors), 4),
        "mean_nearest_seed_distance": round(
            mean_nearest_seed_distance(seed_vectors, synthetic_vectors), 4
        ),
    }


def write_report(
    settings: Settings,
    out_png: Path,
    n_seeds: int = 500,
    *,
    embedder: Embedder | None = None,
    method: Literal["pca", "tsne"] = "pca",
    max_synthetic: int = 2000,
) -> dict[str, Any]:
    """Write the seed-vs-synthetic map to ``out_png``; return counts and diversity measures.

    Distances are cosine distances of unit embeddings (0 = same direction). Measures use the
    newest ``max_synthetic`` problems (the ones plotted); concept coverage uses all of them.
    Raises ValueError when there is no accepted synthetic problem.
    """
    cached = _CachedEmbedder(embedder or Embedder(settings.vectorstore.embedder))
    problems, source, location = load_synthetic(settings, cached)
    problems = [p for p in problems if p["text"].strip()]
    if not problems:
        raise ValueError(f"the accepted problems in {location} all have empty text: nothing to map")
    plotted = sorted(problems, key=lambda p: p["created_at"])[-max_synthetic:]

    domains = sorted({p["domain"] for p in problems})
    n_code = min(n_seeds // 2, 408) if "code" in domains else 0  # 408 shipped Codeforces seeds
    seeds = load_seeds("gsm8k", "train", n_seeds - n_code)
    if n_code:
        seeds += load_seeds("codeforces", "train", n_code)
    seeds = [s for s in seeds if s.text.strip()]

    seed_texts = [s.text for s in seeds]
    synthetic_texts = [p["text"] for p in plotted]
    seed_vectors = cached.embed(seed_texts)
    synthetic_vectors = cached.embed(synthetic_texts)
    # The map embeds both sets again: the cache answers without running the model.
    mapper: Any = cached
    out = write_map(seed_texts, synthetic_texts, out_png, embedder=mapper, method=method)

    by_domain: dict[str, dict[str, Any]] = {}
    for domain in domains:
        syn = np.asarray([p["domain"] == domain for p in plotted], dtype=bool)
        sd = np.asarray([s.domain == domain for s in seeds], dtype=bool)
        by_domain[domain] = {
            "synthetic": int(sum(p["domain"] == domain for p in problems)),
            "seeds": int(sd.sum()),
            **(_measures(seed_vectors[sd], synthetic_vectors[syn]) if syn.any() else {}),
        }

    pool = load_pool(settings.concepts.pool_path)
    coverage: dict[str, dict[str, Any]] = {}
    for domain, dp in sorted(pool.domains.items()):
        used = [p["concepts"] for p in problems if p["domain"] == domain]
        pool_keys = {c.strip().casefold() for c in dp.concepts}
        used_keys = {c.strip().casefold() for concepts in used for c in concepts}
        coverage[domain] = {
            "used": len(used_keys & pool_keys),
            "pool": len(pool_keys),
            "coverage": round(concept_coverage(used, dp.concepts), 4),
        }

    return {
        "source": source,
        "location": location,
        "map": str(out),
        "method": method,
        "synthetic": {
            "total": len(problems),
            "plotted": len(plotted),
            "by_domain": {d: by_domain[d]["synthetic"] for d in domains},
        },
        "seeds": {
            "total": len(seeds),
            "by_source": {
                src: sum(s.source == src for s in seeds)
                for src in sorted({s.source for s in seeds})
            },
        },
        **_measures(seed_vectors, synthetic_vectors),
        "concept_coverage": coverage,
        "by_domain": by_domain,
    }
