"""The filter's dedup/decontamination decision, split for scale-out.

    screened = dedup.embed_and_screen(items)   # stateless + read-only: any number of workers
    decisions = dedup.decide_and_commit(screened)  # the single owner: check-then-commit

Checks, in this order (the first failing one is the reason):
  empty text -> exact normalized-text hash (store + batch) -> benchmark n-gram overlap ->
  benchmark embedding similarity -> a judge's verdict on the benchmark neighbours in the gray zone
  under the embedding threshold (vectorstore/paraphrase.py) -> embedding near-duplicate (store +
  earlier items of the batch).
``decide_and_commit`` writes the accepted items to the store before returning, in one batched
write, so the next batch sees them. Only one owner may call it per store (docs/vectorstore.md).
A redelivered item (same id already stored) is accepted again without a second write, even when
its text differs (a regenerated candidate), so at-least-once delivery stays idempotent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vectorstore.decontam import BenchmarkMatch, ContaminationIndex
from vectorstore.embedder import Embedder, EmptyTextError
from vectorstore.paraphrase import JudgedPair, JudgePair, PairJudge, PairVerdict
from vectorstore.settings import DedupSettings
from vectorstore.store import ProblemStore, StoredProblem
from vectorstore.text import clean_problem_text, hash_key

EMPTY_TEXT = "empty_text"
EXACT_DUPLICATE = "exact_duplicate"
BENCHMARK_NGRAM_OVERLAP = "benchmark_ngram_overlap"
BENCHMARK_NEAR_DUPLICATE = "benchmark_near_duplicate"
BENCHMARK_PARAPHRASE = "benchmark_paraphrase"
NEAR_DUPLICATE = "near_duplicate"
REASONS = (
    EMPTY_TEXT,
    EXACT_DUPLICATE,
    BENCHMARK_NGRAM_OVERLAP,
    BENCHMARK_NEAR_DUPLICATE,
    BENCHMARK_PARAPHRASE,
    NEAR_DUPLICATE,
)


@dataclass(frozen=True)
class CandidateText:
    id: str
    text: str | bytes
    domain: str
    metadata: dict[str, Any] = field(default_factory=dict)  # lineage, stored with the problem


@dataclass(frozen=True)
class FilterDecision:
    id: str
    accepted: bool
    reason: str | None = None  # one of REASONS when rejected
    nearest_id: str | None = None  # stored problem or benchmark item ("aime24:12") matched
    # Cosine for embedding checks; share of the candidate's n-grams for the n-gram check.
    similarity: float | None = None
    judged: tuple[JudgedPair, ...] = ()  # the gray zone's pairs and the judge's verdicts


@dataclass(frozen=True)
class ScreenedCandidate:
    """Output of the stateless half (``embed_and_screen``), input of the owner's decision."""

    id: str
    domain: str
    text: str  # cleaned, char-capped statement ("" when empty)
    text_hash: str
    vector: np.ndarray | None  # unit float32; None when empty
    metadata: dict[str, Any]
    empty: bool = False
    ngram_match: BenchmarkMatch | None = None
    benchmark_match: BenchmarkMatch | None = None  # only when over the threshold
    paraphrase_match: BenchmarkMatch | None = None  # a neighbour the judge called the same
    judged: tuple[JudgedPair, ...] = ()


class DedupFilter:
    def __init__(
        self,
        embedder: Embedder,
        contamination: ContaminationIndex,
        store: ProblemStore | None = None,  # screeners need none; the owner needs it
        settings: DedupSettings | None = None,
        judge: PairJudge | None = None,  # None: no gray-zone judging
    ):
        self.embedder = embedder
        self.contamination = contamination
        self.store = store
        self.settings = settings or DedupSettings()
        self.judge = judge
        self._memo: OrderedDict[tuple[str, str], PairVerdict] = OrderedDict()
        self._memo_lock = threading.Lock()
        # Counters for metrics (the worker exports them).
        self.judge_calls = 0  # calls into the judge (one batch of model requests each)
        # Pairs the judge decided (memo hits excluded), by verdict; "malformed": a model answer
        # that could not be read (the cheap signal decided those).
        self.verdicts = {"same": 0, "different": 0, "malformed": 0}

    # Stateless half --------------------------------------------------------------------------

    def embed_and_screen(self, items: Sequence[CandidateText]) -> list[ScreenedCandidate]:
        """Embed and run the benchmark checks. Reads nothing that changes: safe to run anywhere."""
        texts: list[str] = []
        for item in items:
            try:
                texts.append(self.embedder.prepare(clean_problem_text(item.text)))
            except EmptyTextError:
                texts.append("")
        live = [i for i, text in enumerate(texts) if text]
        vectors = self.embedder.embed([texts[i] for i in live])
        bench = self.contamination.embedding_matches(vectors, [items[i].domain for i in live])
        ngram = {i: self.contamination.ngram_match(texts[i]) for i in live}
        gray = self._judge_gray_zone(items, texts, live, vectors, bench, ngram)
        vector_of = {i: (vectors[row], bench[row]) for row, i in enumerate(live)}
        screened = []
        for i, item in enumerate(items):
            text = texts[i]
            vector, bench_match = vector_of.get(i, (None, None))
            judged, paraphrase_match = gray.get(i, ((), None))
            screened.append(
                ScreenedCandidate(
                    id=item.id,
                    domain=item.domain,
                    text=text,
                    text_hash=hash_key(text) if text else "",
                    vector=vector,
                    metadata=dict(item.metadata),
                    empty=not text,
                    ngram_match=ngram.get(i),
                    benchmark_match=bench_match,
                    paraphrase_match=paraphrase_match,
                    judged=judged,
                )
            )
        return screened

    def _judge_gray_zone(
        self,
        items: Sequence[CandidateText],
        texts: list[str],
        live: list[int],
        vectors: np.ndarray,
        bench: list[BenchmarkMatch | None],
        ngram: dict[int, BenchmarkMatch | None],
    ) -> dict[int, tuple[tuple[JudgedPair, ...], BenchmarkMatch | None]]:
        """Candidates no other benchmark check caught whose nearest benchmark item is at or
        above the lower bound: their top-k neighbours there, judged. Per candidate: the judged
        pairs and the first (most similar) neighbour judged the same problem."""
        cfg = self.contamination.settings.judge
        judge = self.judge
        if judge is None or cfg.kind == "off":
            return {}
        rows = [
            row
            for row, i in enumerate(live)
            if bench[row] is None and ngram[i] is None and items[i].domain in cfg.domains
        ]
        if not rows:
            return {}
        found = self.contamination.neighbours(vectors[rows], cfg.top_k, cfg.lower_bound)
        owners, pairs = [], []
        for row, neighbours in zip(rows, found, strict=True):
            i = live[row]
            for m in neighbours:
                text = self.contamination.text_of(m.benchmark_id)
                pairs.append(JudgePair(texts[i], m.benchmark_id, text, m.similarity))
                owners.append(i)
        result: dict[int, tuple[tuple[JudgedPair, ...], BenchmarkMatch | None]] = {}
        for i, pair, verdict in zip(owners, pairs, self._verdicts(judge, pairs), strict=True):
            judged, match = result.get(i, ((), None))
            if match is None and verdict.same:
                match = BenchmarkMatch(pair.benchmark_id, pair.similarity)
            result[i] = ((*judged, JudgedPair(pair.benchmark_id, pair.similarity, verdict)), match)
        return result

    def _verdicts(self, judge: PairJudge, pairs: list[JudgePair]) -> list[PairVerdict]:
        """The judge's verdict per pair; a pair judged before in this process (same candidate
        text, same benchmark item) keeps its verdict and costs no second call."""
        keys = [(hash_key(p.candidate), p.benchmark_id) for p in pairs]
        with self._memo_lock:
            known = {key: self._memo[key] for key in keys if key in self._memo}
        first: dict[tuple[str, str], int] = {}  # each unknown pair once, even if repeated
        for j, key in enumerate(keys):
            if key not in known:
                first.setdefault(key, j)
        if first:
            fresh = judge.judge([pairs[j] for j in first.values()])
            with self._memo_lock:
                self.judge_calls += 1
                for v in fresh:
                    self.verdicts[
                        "malformed" if v.malformed else "same" if v.same else "different"
                    ] += 1
                for key, verdict in zip(first, fresh, strict=True):
                    known[key] = self._memo[key] = verdict
                    self._memo.move_to_end(key)
                while len(self._memo) > self.contamination.settings.judge.memo_size:
                    self._memo.popitem(last=False)
        return [known[key] for key in keys]

    # Owner half ------------------------------------------------------------------------------

    def decide_and_commit(self, screened: Sequence[ScreenedCandidate]) -> list[FilterDecision]:
        """Final check-then-commit against the store and the batch. Single owner per store."""
        if self.store is None:
            raise RuntimeError("decide_and_commit needs a ProblemStore (only the owner has one)")
        # An id already stored was accepted before: its first decision stands, whatever text a
        # redelivery regenerated under it (ids name the unit of work).
        stored_ids = self.store.existing_ids([s.id for s in screened])
        live = [s for s in screened if not s.empty and s.id not in stored_ids]
        stored_by_hash = self.store.ids_by_hash([s.text_hash for s in live])
        stored_nearest = self.store.nearest(
            np.stack([s.vector for s in live]) if live else np.zeros((0, self.store.dim)), k=1
        )
        nearest_of = {
            id(s): (n[0] if n else None) for s, n in zip(live, stored_nearest, strict=True)
        }

        decisions: list[FilterDecision] = []
        accepted: list[ScreenedCandidate] = []  # this batch, in arrival order
        batch_hashes: dict[str, str] = {}
        to_store: list[StoredProblem] = []
        for item in screened:
            if item.id in stored_ids:
                decisions.append(FilterDecision(item.id, True, None, item.id, 1.0))
                continue
            decision = self._decide(
                item, stored_by_hash, nearest_of.get(id(item)), batch_hashes, accepted
            )
            if item.judged:
                decision = replace(decision, judged=item.judged)
            decisions.append(decision)
            if decision.accepted:
                already_stored = stored_by_hash.get(item.text_hash) == item.id or (
                    decision.nearest_id == item.id
                )
                accepted.append(item)
                batch_hashes.setdefault(item.text_hash, item.id)
                if not already_stored:
                    to_store.append(
                        StoredProblem(
                            item.id,
                            item.text,
                            item.text_hash,
                            item.domain,
                            item.vector,
                            item.metadata,
                        )
                    )
        self.store.add(to_store)
        return decisions

    def _decide(
        self,
        item: ScreenedCandidate,
        stored_by_hash: dict[str, str],
        stored_nearest: tuple[str, float] | None,
        batch_hashes: dict[str, str],
        accepted: list[ScreenedCandidate],
    ) -> FilterDecision:
        if item.empty:
            return FilterDecision(item.id, False, EMPTY_TEXT)
        twin = stored_by_hash.get(item.text_hash) or batch_hashes.get(item.text_hash)
        if twin == item.id:  # redelivery of an item already accepted: idempotent
            return FilterDecision(item.id, True, None, twin, 1.0)
        if twin is not None:
            return FilterDecision(item.id, False, EXACT_DUPLICATE, twin, 1.0)
        if item.ngram_match is not None:
            m = item.ngram_match
            return FilterDecision(
                item.id, False, BENCHMARK_NGRAM_OVERLAP, m.benchmark_id, m.similarity
            )
        if item.benchmark_match is not None:
            m = item.benchmark_match
            return FilterDecision(
                item.id, False, BENCHMARK_NEAR_DUPLICATE, m.benchmark_id, m.similarity
            )
        if item.paraphrase_match is not None:
            m = item.paraphrase_match
            return FilterDecision(
                item.id, False, BENCHMARK_PARAPHRASE, m.benchmark_id, m.similarity
            )
        threshold = self.settings.threshold_for(item.domain)
        best_id, best_sim = stored_nearest if stored_nearest else (None, -1.0)
        if accepted:  # earlier accepted items of this batch are not in the store yet
            sims = np.stack([a.vector for a in accepted]) @ item.vector
            j = int(sims.argmax())
            if float(sims[j]) > best_sim:
                best_id, best_sim = accepted[j].id, float(sims[j])
        if best_id == item.id:
            return FilterDecision(item.id, True, None, best_id, best_sim)
        if best_id is not None and best_sim >= threshold:
            return FilterDecision(item.id, False, NEAR_DUPLICATE, best_id, best_sim)
        return FilterDecision(item.id, True, None, best_id, best_sim if best_id else None)
