"""Calibrate the cosine thresholds on data (``promptcot vectorstore calibrate [--n 600]``), and the
gray zone's judge on the paraphrase set (``promptcot vectorstore paraphrase-curve``).

Near-duplicate pairs: GSM8K test problems vs lightly edited copies (whitespace, renamed people,
changed numbers, reordered sentences, all at once). Distinct pairs: each test problem vs its
nearest *other* problem among GSM8K train (the hardest distinct pair a store of ~7.5k would show),
plus random distinct pairs. Also: nearest-neighbour similarity between distinct code benchmark
problems (templated AtCoder/Codeforces statements). Prints tables; docs/vectorstore.md quotes them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import corpora
from vectorstore.benchmarks import load_benchmark_set, load_benchmarks, resolve_path
from vectorstore.embedder import Embedder
from vectorstore.settings import BenchmarkSetSpec, DecontamSettings

_NAMES = ["Priya", "Tomasz", "Aiko", "Mateo", "Olu", "Freya", "Dmitri", "Lena", "Kwame", "Ines"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_CAPITALIZED = re.compile(r"\b[A-Z][a-z]{2,}\b")


def load_gsm8k(split: str) -> list[str]:
    with corpora.path("gsm8k", f"{split}.jsonl").open(encoding="utf-8") as lines:
        return [json.loads(line)["question"] for line in lines if line.strip()]


def person_names(corpus: list[str]) -> set[str]:
    """Capitalized words never seen in lower case anywhere in the corpus: people and places."""
    lower_words = {w for text in corpus for w in re.findall(r"\b[a-z]{3,}\b", text)}
    return {
        w for text in corpus for w in _CAPITALIZED.findall(text) if w.lower() not in lower_words
    }


def edit_whitespace(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    return "  ".join(words[: len(words) // 2]) + " \n " + " ".join(words[len(words) // 2 :]) + "  "


def edit_names(text: str, rng: random.Random, names: set[str]) -> str:
    mapping: dict[str, str] = {}
    for word in _CAPITALIZED.findall(text):
        if word in names and word not in mapping:
            mapping[word] = rng.choice([n for n in _NAMES if n not in mapping.values()])
    return _CAPITALIZED.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def edit_numbers(text: str, rng: random.Random) -> str:
    def change(match: re.Match) -> str:
        value = float(match.group(0))
        new = max(1, round(value * rng.uniform(0.5, 1.8))) if value >= 1 else value
        new = new if new != value else value + 1
        return str(int(new)) if float(new).is_integer() else str(new)

    return _NUMBER.sub(change, text)


def edit_reorder(text: str, rng: random.Random) -> str:
    sentences = _SENTENCE_END.split(text.strip())
    if len(sentences) < 3:
        return " ".join(reversed(sentences)) if len(sentences) == 2 else text
    body, question = sentences[:-1], sentences[-1]
    shuffled = body[:]
    while shuffled == body:
        rng.shuffle(shuffled)
    return " ".join([*shuffled, question])


def make_edits(names: set[str]) -> dict[str, Callable[[str, random.Random], str]]:
    return {
        "whitespace": edit_whitespace,
        "renamed": lambda t, r: edit_names(t, r, names),
        "numbers": edit_numbers,
        "reordered": edit_reorder,
        "all_edits": lambda t, r: edit_whitespace(
            edit_reorder(edit_numbers(edit_names(t, r, names), r), r), r
        ),
    }


def percentiles(values: np.ndarray) -> str:
    qs = [1, 5, 50, 95, 99]
    return " ".join(f"p{q}={np.percentile(values, q):.3f}" for q in qs)


def nearest_other(queries: np.ndarray, pool: np.ndarray, same: bool) -> np.ndarray:
    sims = queries @ pool.T
    if same:
        np.fill_diagonal(sims, -1.0)
    return sims.max(axis=1)


def calibrate(n: int = 600, seed: int = 0) -> Iterator[str]:
    """The report's lines (``promptcot vectorstore calibrate``)."""
    rng = random.Random(seed)
    test, train = load_gsm8k("test"), load_gsm8k("train")
    names = person_names(train + test)
    sample = rng.sample(test, n)
    embedder = Embedder()

    originals = embedder.embed(sample)
    edit_sims: dict[str, np.ndarray] = {}
    for kind, edit in make_edits(names).items():
        edited = [edit(text, rng) for text in sample]
        edit_sims[kind] = np.sum(originals * embedder.embed(edited), axis=1)
    train_vectors = embedder.embed(train)
    distinct_nn = nearest_other(originals, train_vectors, same=False)
    pairs = [(a, b) for a, b in (rng.sample(range(len(train)), 2) for _ in range(5000))]
    distinct_random = np.array([train_vectors[a] @ train_vectors[b] for a, b in pairs])

    bench = load_benchmarks(DecontamSettings().benchmark_sets)
    code = [b.text for b in bench if b.domain == "code"]
    math = [b.text for b in bench if b.domain == "math" and not b.id.startswith("gsm8k")]
    code_nn = nearest_other(*(2 * [embedder.embed(code)]), same=True)
    math_nn = nearest_other(*(2 * [embedder.embed(math)]), same=True)

    yield f"# {n} GSM8K test problems; {len(names)} names detected"
    yield "## near-duplicate pairs (original vs edited copy), cosine"
    for kind, sims in edit_sims.items():
        yield f"{kind:12s} {percentiles(sims)}"
    yield "## distinct problems, cosine"
    yield f"{'nn_in_train':12s} {percentiles(distinct_nn)}"
    yield f"{'random':12s} {percentiles(distinct_random)}"
    yield f"{'code_bench_nn':12s} {percentiles(code_nn)}  (n={len(code)})"
    yield f"{'math_bench_nn':12s} {percentiles(math_nn)}  (n={len(math)})"
    yield "## threshold sweep: recall on edited copies | share of distinct problems rejected"
    all_edits = np.concatenate(list(edit_sims.values()))
    for t in np.arange(0.70, 0.96, 0.02):
        per_kind = " ".join(f"{k}={np.mean(s >= t):.3f}" for k, s in edit_sims.items())
        yield (
            f"t={t:.2f} recall_all={np.mean(all_edits >= t):.3f} ({per_kind}) "
            f"fp_nn_train={np.mean(distinct_nn >= t):.3f} fp_code_nn={np.mean(code_nn >= t):.3f} "
            f"fp_math_nn={np.mean(math_nn >= t):.3f} fp_random={np.mean(distinct_random >= t):.4f}"
        )
    yield f"embedder: {embedder.texts_embedded} texts, {embedder.tokens_embedded} tokens"


# --- the gray zone: a judge over the nearest benchmark items ------------------------------------

PARAPHRASE_SET = "paraphrases/paraphrases.jsonl"  # under corpora/; corpora/paraphrases/README.md


@dataclass(frozen=True)
class ParaphraseItem:
    id: str  # "para:<benchmark id>" or "miss:<benchmark id>"
    kind: str  # "paraphrase" (the same problem reworded) | "near_miss" (a different problem)
    source: str  # the benchmark item it was written from, e.g. "aime24:12"
    text: str
    change: str = ""  # near misses: what makes it a different problem


def load_paraphrase_set(path: str | Path = PARAPHRASE_SET) -> list[ParaphraseItem]:
    with resolve_path(path).open(encoding="utf-8") as lines:
        return [ParaphraseItem(**json.loads(line)) for line in lines if line.strip()]


@dataclass
class _Outcome:
    """What the filter's benchmark checks make of one text, for any lower bound, k and bits."""

    ngram: str | None  # benchmark id of an n-gram match
    # (benchmark id, cosine, same numbers, their bits), most similar first
    neighbours: list[tuple[str, float, bool, float]]
    threshold: float

    def decide(self, lower_bound: float, k: int, min_bits: float) -> tuple[str, str | None]:
        """(how it ends: "ngram" | "embedding" | "judge" | "accepted", the matched item)."""
        if self.ngram:
            return "ngram", self.ngram
        best_id, best = self.neighbours[0][:2] if self.neighbours else (None, -1.0)
        if best >= self.threshold:
            return "embedding", best_id
        for benchmark_id, similarity, same, bits in self.neighbours[:k]:
            if similarity >= lower_bound and same and bits >= min_bits:
                return "judge", benchmark_id
        return "accepted", None

    def judged(self, lower_bound: float) -> bool:
        return self.ngram is None and lower_bound <= self.neighbours[0][1] < self.threshold


def _outcomes(index, judge, texts: list[str], vectors: np.ndarray, max_k: int) -> list[_Outcome]:
    from vectorstore.paraphrase import JudgePair

    threshold = index.settings.threshold_for("math")
    out = []
    for text, found in zip(texts, index.neighbours(vectors, max_k, at_least=-1.0), strict=True):
        neighbours = []
        for m in found:
            pair = JudgePair(text, m.benchmark_id, index.text_of(m.benchmark_id), m.similarity)
            diff, bits = judge.evidence(pair)
            neighbours.append((m.benchmark_id, m.similarity, diff.same, bits))
        ngram = index.ngram_match(text)
        out.append(_Outcome(ngram.benchmark_id if ngram else None, neighbours, threshold))
    return out


def paraphrase_curve(
    lower_bounds: Sequence[float] = (0.50, 0.55, 0.60, 0.65, 0.70, 0.75),
    ks: Sequence[int] = (1, 2, 3, 5),
    min_bits: Sequence[float] = (0.0, 2.0, 4.0, 6.0, 8.0),
    train_limit: int | None = None,
) -> Iterator[str]:
    """The report's lines (``promptcot vectorstore paraphrase-curve``): recall on the paraphrase
    set and false positives on its near misses and on GSM8K train, for each lower bound and k
    (at the configured ``min_number_bits``), then for each ``min_number_bits`` (at the
    configured lower bound and k), with the cheap judge behind the filter's other checks."""
    from vectorstore.decontam import ContaminationIndex, cached_embeddings
    from vectorstore.paraphrase import SkeletonJudge

    settings = DecontamSettings()
    cfg = settings.judge
    embedder = Embedder()
    index = ContaminationIndex.from_settings(embedder, settings)
    judge = SkeletonJudge.for_benchmarks((i.text for i in index.items), cfg)
    items = load_paraphrase_set()
    paraphrases = [i for i in items if i.kind == "paraphrase"]
    near_misses = [i for i in items if i.kind == "near_miss"]
    spec = BenchmarkSetSpec(name="gsm8k_train", path="gsm8k/train.jsonl", text_field="question")
    train = load_benchmark_set(spec)
    train_vectors = cached_embeddings(embedder, train, [spec], settings.cache_dir)
    if train_limit is not None:
        train, train_vectors = train[:train_limit], train_vectors[:train_limit]
    sets = {"paraphrase": paraphrases, "near_miss": near_misses, "gsm8k_train": train}
    outcomes = {
        name: _outcomes(
            index,
            judge,
            [row.text for row in rows],
            train_vectors if name == "gsm8k_train" else embedder.embed([r.text for r in rows]),
            max(*ks, cfg.top_k),
        )
        for name, rows in sets.items()
    }

    threshold = settings.threshold_for("math")
    yield (
        f"# {len(paraphrases)} paraphrases, {len(near_misses)} near misses "
        f"({PARAPHRASE_SET}), {len(train)} GSM8K train questions; judge {SkeletonJudge.name}; "
        f"embedding threshold {threshold:.2f}"
    )
    cosines = np.array([o.neighbours[0][1] for o in outcomes["paraphrase"]])
    under = sum(o.decide(threshold, 0, 0.0)[0] == "accepted" for o in outcomes["paraphrase"])
    yield (
        f"paraphrases: cosine to the nearest benchmark item {percentiles(cosines)}; "
        f"{under} of {len(paraphrases)} pass the n-gram and embedding checks"
    )
    yield (
        "## recall: paraphrases rejected (right_item: naming the item they were written from); "
        "fp_near: near misses rejected by the judge (near_all: by any benchmark check); "
        "fp_train: GSM8K train rejected by the judge (train_all: by any check); judged: share "
        "of GSM8K train that reaches the judge (its calls per candidate)"
    )

    def line(lower_bound: float, k: int, bits: float) -> str:
        ends = {
            name: [o.decide(lower_bound, k, bits) for o in found]
            for name, found in outcomes.items()
        }

        def share(name: str, *how: str) -> float:
            return float(np.mean([end in how for end, _ in ends[name]]))

        right = [m == p.source for p, (_, m) in zip(paraphrases, ends["paraphrase"], strict=True)]
        judged = np.mean([o.judged(lower_bound) for o in outcomes["gsm8k_train"]])
        caught = ("ngram", "embedding", "judge")
        return (
            f"L={lower_bound:.2f} k={k} bits={bits:g} "
            f"recall={share('paraphrase', *caught):.3f} right_item={np.mean(right):.3f} "
            f"fp_near={share('near_miss', 'judge'):.3f} near_all={share('near_miss', *caught):.3f} "
            f"fp_train={share('gsm8k_train', 'judge'):.4f} "
            f"train_all={share('gsm8k_train', *caught):.4f} judged={judged:.3f}"
        )

    yield f"## lower bound L x neighbours k, at min_number_bits={cfg.min_number_bits:g}"
    for lower_bound in lower_bounds:
        for k in ks:
            yield line(lower_bound, k, cfg.min_number_bits)
    yield f"## min_number_bits, at L={cfg.lower_bound:.2f} k={cfg.top_k}"
    for bits in min_bits:
        yield line(cfg.lower_bound, cfg.top_k, bits)
    defaults = f"L={cfg.lower_bound:.2f}, k={cfg.top_k}, bits={cfg.min_number_bits:g}"
    yield f"## at the defaults ({defaults}): what becomes of each set"
    for name, rows in sets.items():
        ends = [o.decide(cfg.lower_bound, cfg.top_k, cfg.min_number_bits) for o in outcomes[name]]
        counts = {end: sum(e == end for e, _ in ends) for end in ("ngram", "embedding", "judge")}
        yield f"{name}: {counts}, accepted {sum(e == 'accepted' for e, _ in ends)}"
        for row, (end, match) in zip(rows, ends, strict=True):
            missed = name == "paraphrase" and (end == "accepted" or match != row.source)
            if missed or (name != "paraphrase" and end == "judge"):
                yield f"  {row.id}: {end} {match or ''}"
