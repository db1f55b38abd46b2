"""Benchmark contamination index: n-gram overlap and embedding similarity to evaluation sets.

(b) n-grams: 13-grams (default) over placeholder-normalized tokens (vectorstore.text.ngram_tokens:
numbers -> <num>, single-letter identifiers -> <v>, LaTeX commands and punctuation dropped), so
copies with renamed variables, reformatted numbers or new whitespace still share n-grams.
N-grams present in many benchmark items (statement boilerplate) are not evidence and are ignored.
(d) embeddings: cosine against an in-memory matrix of benchmark vectors (~2.2k x 384 by default).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vectorstore.benchmarks import BenchmarkItem, load_benchmarks, resolve_path
from vectorstore.embedder import Embedder
from vectorstore.settings import DecontamSettings
from vectorstore.text import ngram_tokens, ngrams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkMatch:
    benchmark_id: str  # e.g. "aime24:12"
    # n-gram match: share of the candidate's n-grams found in that item; embedding: cosine.
    similarity: float
    shared_ngrams: int = 0


class ContaminationIndex:
    def __init__(
        self,
        items: Sequence[BenchmarkItem],
        vectors: np.ndarray,
        settings: DecontamSettings | None = None,
    ):
        self.settings = settings or DecontamSettings()
        self.items = list(items)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if len(self.vectors) != len(self.items):
            raise ValueError("one vector per benchmark item")
        self._position = {item.id: i for i, item in enumerate(self.items)}
        self._short_lengths: set[int] = set()  # items shorter than n are indexed whole
        self._owners = self._build_ngram_index()

    @classmethod
    def from_settings(cls, embedder: Embedder, settings: DecontamSettings | None = None):
        settings = settings or DecontamSettings()
        specs = [*settings.benchmark_sets, *settings.extra_benchmark_sets]
        items = load_benchmarks(specs)
        vectors = cached_embeddings(embedder, items, specs, settings.cache_dir)
        return cls(items, vectors, settings)

    def _build_ngram_index(self) -> dict[int, tuple[int, ...]]:
        n = self.settings.ngram_size
        owners: dict[int, list[int]] = defaultdict(list)
        for position, item in enumerate(self.items):
            tokens = ngram_tokens(item.text)
            if len(tokens) < n:
                self._short_lengths.add(len(tokens))
            # Python's tuple hash: 64-bit, stable within the process; far smaller than the tuples.
            for gram in {hash(g) for g in ngrams(tokens, n)}:
                owners[gram].append(position)
        cap = self.settings.boilerplate_min_items
        kept = {g: tuple(p) for g, p in owners.items() if len(p) < cap}
        log.info(
            "n-gram index: %d grams kept, %d boilerplate dropped",
            len(kept),
            len(owners) - len(kept),
        )
        return kept

    def ngram_match(self, text: str) -> BenchmarkMatch | None:
        """The benchmark item sharing the most n-grams with text, if at least min_shared."""
        tokens = ngram_tokens(text)
        grams = {hash(g) for g in ngrams(tokens, self.settings.ngram_size)}
        for length in self._short_lengths:  # whole short benchmark items inside a longer text
            grams |= {hash(g) for g in ngrams(tokens, length)} if len(tokens) >= length else set()
        if not grams:
            return None
        shared: Counter[int] = Counter()
        for gram in grams:
            for position in self._owners.get(gram, ()):
                shared[position] += 1
        if not shared:
            return None
        position, count = shared.most_common(1)[0]
        if count < self.settings.min_shared_ngrams:
            return None
        return BenchmarkMatch(self.items[position].id, count / len(grams), count)

    def nearest(self, vectors: np.ndarray) -> list[BenchmarkMatch]:
        """Most similar benchmark item per query vector (cosine; vectors are unit)."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        if len(self.items) == 0:
            return [BenchmarkMatch("", 0.0) for _ in range(len(queries))]
        similarities = queries @ self.vectors.T
        best = similarities.argmax(axis=1)
        return [
            BenchmarkMatch(self.items[b].id, float(similarities[row, b]))
            for row, b in enumerate(best)
        ]

    def neighbours(
        self, vectors: np.ndarray, k: int, at_least: float
    ) -> list[list[BenchmarkMatch]]:
        """Per query, up to k benchmark items with cosine >= at_least, most similar first."""
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.vectors.shape[1])
        if len(self.items) == 0 or len(queries) == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        similarities = queries @ self.vectors.T
        k = min(k, len(self.items))
        top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
        out = []
        for row, candidates in enumerate(top):
            ranked = sorted(candidates, key=lambda b: -similarities[row, b])
            out.append(
                [
                    BenchmarkMatch(self.items[b].id, float(similarities[row, b]))
                    for b in ranked
                    if similarities[row, b] >= at_least
                ]
            )
        return out

    def text_of(self, benchmark_id: str) -> str:
        return self.items[self._position[benchmark_id]].text

    def embedding_matches(
        self, vectors: np.ndarray, domains: Sequence[str] | None = None
    ) -> list[BenchmarkMatch | None]:
        """Per query: the nearest benchmark item when at or above its domain's threshold."""
        matches = self.nearest(vectors)
        domains = domains if domains is not None else ["math"] * len(matches)
        return [
            m if m.similarity >= self.settings.threshold_for(domain) else None
            for m, domain in zip(matches, domains, strict=True)
        ]


def _model_identity(model_path: str | Path) -> str:
    """What makes two copies of a model the same model, wherever they are installed: the folder
    name, its config and its weight sizes (the absolute path differs between venvs)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return str(model_path)
    parts = [folder.name]
    for config in sorted(folder.glob("*.json")):
        parts.append(hashlib.sha256(config.read_bytes()).hexdigest()[:12])
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        parts.append(f"{weights.name}:{weights.stat().st_size}")
    return "|".join(parts)


def cached_embeddings(
    embedder: Embedder, items: list[BenchmarkItem], specs, cache_dir: Path | None
) -> np.ndarray:
    """Vectors of JSONL-backed items (the benchmark sets; GSM8K train for calibration), reused
    across restarts when cache_dir is set (key: model, set specs and file bytes)."""
    if not items:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    if cache_dir is None:
        return embedder.embed([item.text for item in items])
    model = (
        f"{_model_identity(embedder.model_path)}|{embedder.max_seq_length}"
        f"|{embedder.settings.max_chars}"
    )
    key = hashlib.sha256(model.encode())
    for spec in specs:
        key.update(spec.model_dump_json().encode())
        key.update(resolve_path(spec.path).read_bytes())
    path = Path(cache_dir) / f"benchmarks-{key.hexdigest()[:16]}.npy"
    if path.is_file():
        vectors = np.load(path)
        if vectors.shape == (len(items), embedder.dim):
            return vectors
    vectors = embedder.embed([item.text for item in items])
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: screeners starting together never read a half-written file.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with partial.open("wb") as out:
        np.save(out, vectors)
    os.replace(partial, path)
    return vectors
