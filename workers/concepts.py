"""The concept pool (what concepts exist and which go together) and PromptCoT 1.0's concept-set
sampler.

Pool: per domain, from annotated seeds: how many seeds name each concept (frequency), how many
name each pair (co-occurrence, sparse, symmetric), and optionally L2-normalized concept embeddings
from an injected embedder. Concept names are merged case-insensitively after whitespace cleanup;
the first spelling seen is kept.

File format (one JSON file, so it ships as package data and diffs readably)::

    {"format": "promptcot-concept-pool", "version": 1, "domains": {"math": {
        "n_seeds": 7448, "concepts": [...], "counts": [...],
        "pairs": [[i, j, count], ...],            # i < j, only pairs seen together
        "embeddings": null | {"model": "...", "dim": 384, "dtype": "float32",
                              "base64": "<row-major little-endian float32>"}}}}

Sampler (PromptCoT 1.0): the first concept is drawn with probability proportional to its
frequency; the set then grows to ``set_size``; each remaining candidate j gets

    score(j) = cooccurrence_weight * mean_{i in chosen} assoc(i, j)
             + embedding_weight  * cos(e_j, mean_{i in chosen} e_i)

and the next concept is drawn from softmax(score / temperature) over the candidates not yet
chosen. ``assoc`` is one of (settings.cooccurrence_measure; both in [0, 1], the cosine's
working range, so the two weights are comparable):

- ``log_count`` (default): log(1 + n_ij) / log(1 + max pair count in the domain).
- ``npmi``: positive part of normalized PMI, log(p_ij / (p_i p_j)) / -log p_ij; 0 for pairs never
  seen together. It discounts concepts that appear everywhere, but on the shipped pool its values
  are small (median 0.09 over seen pairs), so at temperature 0.2 sets come out close to uniform:
  57% of their pairs were ever seen together in a seed, vs 41% for random sets and 91% with
  log_count (400 draws per domain, math; code 49% / 35% / 81%). Hence log_count by default.

Without embeddings the cosine term is 0; a domain with fewer concepts than ``set_size`` yields
all of them.

Reproducibility: draw k uses a generator seeded with (settings.seed, k), so it is a pure
function of pool, settings and k (a restarted sampler given ``first_draw=k`` continues the same
stream); ``draw = f"{seed}:{k}"`` keeps ids unique. Run sampler replicas with distinct seeds.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

import corpora
from streams.records import AnnotatedSeed, ConceptSet
from workers.settings import ConceptSettings

POOL_FORMAT = "promptcot-concept-pool"
POOL_VERSION = 1

Embed = Callable[[list[str]], np.ndarray]
Annotation = AnnotatedSeed | tuple[str, Sequence[str]]

_SPACES = re.compile(r"\s+")


def default_pool_path() -> Path:
    return corpora.path("concepts", "pool.json")


def clean_concept(name: str) -> str:
    """Collapse whitespace and drop trailing punctuation that LLM lists leave behind."""
    return _SPACES.sub(" ", name).strip().rstrip(".;:,").strip()


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)  # an all-zero vector stays zero: cosine 0


@dataclass
class DomainPool:
    concepts: list[str]
    counts: np.ndarray  # (n,) int64: seeds naming each concept
    cooccurrence: sparse.csr_array  # (n, n) int64, symmetric, zero diagonal
    n_seeds: int
    embeddings: np.ndarray | None = None  # (n, d) float32, unit rows
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {name: i for i, name in enumerate(self.concepts)}

    def __len__(self) -> int:
        return len(self.concepts)

    def association(self, chosen: Sequence[int], measure: str = "log_count") -> np.ndarray:
        """(n,) mean association of every concept with the chosen ones, in [0, 1]."""
        rows = self.cooccurrence[list(chosen)].toarray().astype(np.float64)  # (len(chosen), n)
        if measure == "log_count":
            top = self.cooccurrence.max() if self.cooccurrence.nnz else 0
            assoc = np.log1p(rows) / np.log1p(top) if top > 0 else np.zeros_like(rows)
        elif measure == "npmi":
            assoc = np.zeros_like(rows)
            seen = rows > 0
            n = float(self.n_seeds)
            p_pair = rows / n
            p_row = (self.counts[list(chosen)] / n)[:, None]
            p_col = (self.counts / n)[None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                pmi = np.log(p_pair / (p_row * p_col))
                denom = -np.log(p_pair)
                # A pair present in every seed (denom 0) is as associated as it gets.
                npmi = np.where(denom > 0, pmi / np.where(denom > 0, denom, 1.0), 1.0)
            assoc[seen] = np.clip(npmi[seen], 0.0, 1.0)
        else:
            raise ValueError(f"unknown co-occurrence measure {measure!r}")
        return assoc.mean(axis=0)

    def similarity(self, chosen: Sequence[int]) -> np.ndarray:
        """(n,) cosine of every concept with the mean embedding of the chosen ones (0 without
        embeddings)."""
        if self.embeddings is None:
            return np.zeros(len(self), dtype=np.float64)
        centre = _unit_rows(self.embeddings[list(chosen)].mean(axis=0, keepdims=True))[0]
        return (self.embeddings @ centre).astype(np.float64)

    def summary(self) -> dict[str, float | int | bool]:
        n = len(self)
        pairs = self.cooccurrence.nnz // 2
        return {
            "concepts": n,
            "seeds": self.n_seeds,
            "pairs_seen": pairs,
            # Share of all concept pairs seen together at least once.
            "cooccurrence_density": round(pairs / (n * (n - 1) / 2), 4) if n > 1 else 0.0,
            "mean_concepts_per_seed": round(float(self.counts.sum()) / self.n_seeds, 3)
            if self.n_seeds
            else 0.0,
            "embeddings": self.embeddings is not None,
        }


def _count_domain(annotations: list[list[str]]) -> DomainPool:
    names: list[str] = []
    key_to_index: dict[str, int] = {}
    seed_sets: list[list[int]] = []
    for concepts in annotations:
        members: set[int] = set()
        for raw in concepts:
            name = clean_concept(raw)
            if not name:
                continue
            key = name.casefold()
            if key not in key_to_index:
                key_to_index[key] = len(names)
                names.append(name)
            members.add(key_to_index[key])
        if members:
            seed_sets.append(sorted(members))
    n = len(names)
    counts = np.zeros(n, dtype=np.int64)
    rows: list[int] = []
    cols: list[int] = []
    for members in seed_sets:
        counts[members] += 1
        for a in members:
            for b in members:
                if a != b:
                    rows.append(a)
                    cols.append(b)
    data = np.ones(len(rows), dtype=np.int64)
    cooc = sparse.csr_array((data, (rows, cols)), shape=(n, n), dtype=np.int64)  # duplicates sum
    cooc.sum_duplicates()
    return DomainPool(names, counts, cooc, n_seeds=len(seed_sets))


class ConceptPool:
    def __init__(self, domains: dict[str, DomainPool], embedder_name: str | None = None):
        self.domains = domains
        self.embedder_name = embedder_name

    @classmethod
    def from_annotated(
        cls,
        seeds: Iterable[Annotation],
        embed: Embed | None = None,
        embedder_name: str | None = None,
    ) -> ConceptPool:
        """Count concepts per domain from AnnotatedSeed records or (domain, concepts) pairs."""
        by_domain: dict[str, list[list[str]]] = {}
        for seed in seeds:
            domain, concepts = (
                (seed.domain, seed.concepts) if isinstance(seed, AnnotatedSeed) else seed
            )
            by_domain.setdefault(domain, []).append(list(concepts))
        pool = cls({d: _count_domain(a) for d, a in sorted(by_domain.items())})
        return pool.with_embeddings(embed, embedder_name) if embed is not None else pool

    def with_embeddings(self, embed: Embed, embedder_name: str | None = None) -> ConceptPool:
        """A copy whose domains carry unit-norm embeddings of their concept names."""
        domains = {}
        for name, dp in self.domains.items():
            vectors = np.asarray(embed(list(dp.concepts)), dtype=np.float32) if len(dp) else None
            if vectors is not None and vectors.shape[0] != len(dp):
                raise ValueError(
                    f"embedder returned {vectors.shape[0]} vectors for {len(dp)} concepts"
                )
            domains[name] = DomainPool(
                dp.concepts,
                dp.counts,
                dp.cooccurrence,
                dp.n_seeds,
                _unit_rows(vectors) if vectors is not None else None,
            )
        return ConceptPool(domains, embedder_name)

    def domain(self, name: str) -> DomainPool:
        if name not in self.domains:
            raise KeyError(f"concept pool has no domain {name!r} (has {sorted(self.domains)})")
        return self.domains[name]

    def summary(self) -> dict[str, dict[str, float | int | bool]]:
        return {name: dp.summary() for name, dp in self.domains.items()}

    # --- persistence --------------------------------------------------------------------------

    def to_json(self) -> dict:
        domains = {}
        for name, dp in self.domains.items():
            upper = sparse.triu(dp.cooccurrence, k=1).tocoo()
            order = np.lexsort((upper.col, upper.row))  # stable file content: diffs stay small
            pairs = [[int(upper.row[k]), int(upper.col[k]), int(upper.data[k])] for k in order]
            embeddings = None
            if dp.embeddings is not None:
                matrix = np.ascontiguousarray(dp.embeddings, dtype="<f4")
                embeddings = {
                    "model": self.embedder_name,
                    "dim": int(matrix.shape[1]),
                    "dtype": "float32",
                    "base64": base64.b64encode(matrix.tobytes()).decode("ascii"),
                }
            domains[name] = {
                "n_seeds": dp.n_seeds,
                "concepts": dp.concepts,
                "counts": [int(c) for c in dp.counts],
                "pairs": pairs,
                "embeddings": embeddings,
            }
        return {"format": POOL_FORMAT, "version": POOL_VERSION, "domains": domains}

    @classmethod
    def from_json(cls, raw: dict) -> ConceptPool:
        if raw.get("format") != POOL_FORMAT or raw.get("version") != POOL_VERSION:
            raise ValueError(f"not a {POOL_FORMAT} v{POOL_VERSION} file")
        domains: dict[str, DomainPool] = {}
        embedder_name = None
        for name, body in raw["domains"].items():
            n = len(body["concepts"])
            pairs = np.asarray(body["pairs"], dtype=np.int64).reshape(-1, 3)
            rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
            cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
            data = np.concatenate([pairs[:, 2], pairs[:, 2]])
            cooc = sparse.csr_array((data, (rows, cols)), shape=(n, n), dtype=np.int64)
            embeddings = None
            if body.get("embeddings"):
                spec = body["embeddings"]
                flat = np.frombuffer(base64.b64decode(spec["base64"]), dtype="<f4")
                embeddings = flat.reshape(n, spec["dim"]).astype(np.float32)
                embedder_name = spec.get("model") or embedder_name
            domains[name] = DomainPool(
                list(body["concepts"]),
                np.asarray(body["counts"], dtype=np.int64),
                cooc,
                int(body["n_seeds"]),
                embeddings,
            )
        return cls(domains, embedder_name)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(
            json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        tmp.replace(path)  # atomic: a reader never sees half a pool
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptPool:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def load_pool(path: str | Path | None = None) -> ConceptPool:
    """The pool at ``path``, or the one shipped with the factory."""
    return ConceptPool.load(path if path is not None else default_pool_path())


# --- sampling ---------------------------------------------------------------------------------


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z = z - z[np.isfinite(z)].max()  # shift: exp never overflows; masked -inf -> probability 0
    weights = np.exp(z)
    return weights / weights.sum()


class ConceptSampler:
    def __init__(
        self,
        pool: ConceptPool,
        settings: ConceptSettings | None = None,
        rng: np.random.Generator | None = None,
        first_draw: int = 0,
    ):
        self.pool = pool
        self.settings = settings or ConceptSettings()
        self.rng = rng  # None: each draw seeds its own generator from (seed, draw number)
        self.draws = first_draw

    def _generator(self, draw: int) -> np.random.Generator:
        return (
            self.rng if self.rng is not None else np.random.default_rng([self.settings.seed, draw])
        )

    def grow(self, domain: str, rng: np.random.Generator, first: int | None = None) -> list[int]:
        """Indices of one concept set: a frequency-drawn first concept, then softmax growth."""
        dp = self.pool.domain(domain)
        if len(dp) == 0:
            raise ValueError(f"concept pool has no {domain!r} concepts")
        s = self.settings
        if first is None:
            first = int(rng.choice(len(dp), p=dp.counts / dp.counts.sum()))
        chosen = [first]
        while len(chosen) < min(s.set_size, len(dp)):
            score = s.cooccurrence_weight * dp.association(chosen, s.cooccurrence_measure)
            if s.embedding_weight and dp.embeddings is not None:
                score = score + s.embedding_weight * dp.similarity(chosen)
            score[chosen] = -np.inf  # without repeats
            chosen.append(int(rng.choice(len(dp), p=_softmax(score, s.temperature))))
        return chosen

    def difficulty(self, domain: str, rng: np.random.Generator) -> str:
        ladder = self.settings.difficulty_ladders.get(domain)
        if not ladder:
            raise ValueError(f"no difficulty ladder for domain {domain!r}")
        weights = (self.settings.difficulty_weights or {}).get(domain)
        p = np.asarray(weights, dtype=np.float64) / sum(weights) if weights else None
        return str(ladder[int(rng.choice(len(ladder), p=p))])

    def sample(self, domain: str) -> ConceptSet:
        draw = self.draws
        self.draws += 1
        rng = self._generator(draw)
        dp = self.pool.domain(domain)
        concepts = [dp.concepts[i] for i in self.grow(domain, rng)]
        return ConceptSet(
            domain=domain,
            concepts=concepts,
            difficulty=self.difficulty(domain, rng),
            draw=f"{self.settings.seed}:{draw}",
        )
