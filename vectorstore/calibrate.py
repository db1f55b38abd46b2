"""Calibrate the cosine thresholds on data (``promptcot vectorstore calibrate [--n 600]``).

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
from collections.abc import Callable, Iterator

import numpy as np

import corpora
from vectorstore.benchmarks import load_benchmarks
from vectorstore.embedder import Embedder
from vectorstore.settings import DecontamSettings

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
