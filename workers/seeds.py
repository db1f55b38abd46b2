"""Seed problems from the shipped corpora, and the default concept pool built from them.

- ``load_seeds("gsm8k", "train"|"test", limit)``: ``answer`` is the number after ``####``,
  ``solution`` the worked solution it ends.
- ``load_seeds("codeforces", "train"|"all", limit)``: the one shipped file (408 problems). Its
  ``prompt`` wraps each statement in ChatML and an instruction preamble/trailer; ``text`` is the
  bare statement and ``tests`` the stdin/stdout pairs from ``input_output``.
- ``build_default_pool(embed=None)``: annotate GSM8K train + Codeforces with the lexicon
  (no LLM needed) and count concepts. ``promptcot seeds build-pool [--embed] [--out P]``
  regenerates ``corpora/concepts/pool.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np

import corpora
from streams.records import SeedProblem
from workers.concepts import ConceptPool
from workers.lexicon import annotate_with_lexicon

Source = Literal["gsm8k", "codeforces"]

# The shipped Codeforces prompts all share this wrapper (checked on all 408 rows).
_CF_QUESTION = re.compile(r"^.*?\bQuestion:\s*", re.DOTALL)
_CF_TRAILER = re.compile(r"\s*Read the inputs from stdin solve the problem.*$", re.DOTALL)
_CHATML_TAG = re.compile(r"<\|im_(?:start|end)\|>(?:user|assistant|system)?")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$")


def _read_jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def gsm8k_final_answer(solution: str) -> str:
    """The number after ``####`` with thousands separators removed (``1,000`` -> ``1000``)."""
    match = _GSM8K_ANSWER.search(solution.strip())
    if match is None:
        raise ValueError("GSM8K solution has no '#### answer' line")
    return match.group(1).replace(",", "").strip()


def codeforces_statement(prompt: str) -> str:
    """The bare problem statement inside a shipped ChatML-wrapped Codeforces prompt."""
    text = _CF_TRAILER.sub("", _CF_QUESTION.sub("", prompt, count=1))
    return _CHATML_TAG.sub("", text).strip()


def codeforces_tests(input_output: str) -> list[dict[str, str]]:
    io = json.loads(input_output)
    inputs, outputs = io.get("inputs", []), io.get("outputs", [])
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} test inputs but {len(outputs)} outputs")
    return [{"input": str(i), "output": str(o)} for i, o in zip(inputs, outputs)]


def _gsm8k(split: str) -> Iterator[SeedProblem]:
    if split not in ("train", "test"):
        raise ValueError(f"gsm8k has splits 'train' and 'test', not {split!r}")
    for index, row in enumerate(_read_jsonl(corpora.path("gsm8k", f"{split}.jsonl"))):
        yield SeedProblem(
            source="gsm8k",
            source_id=f"{split}-{index}",
            domain="math",
            text=row["question"].strip(),
            answer=gsm8k_final_answer(row["answer"]),
            solution=row["answer"].strip(),
        )


def _codeforces(split: str) -> Iterator[SeedProblem]:
    # One shipped file; "train" is accepted because callers ask every source for its train split.
    if split not in ("train", "all"):
        raise ValueError(f"codeforces ships one split ('train' or 'all'), not {split!r}")
    for index, row in enumerate(_read_jsonl(corpora.path("benchmarks", "codeforces.jsonl"))):
        yield SeedProblem(
            source="codeforces",
            source_id=str(index),
            domain="code",
            text=codeforces_statement(row["prompt"]),
            tests=codeforces_tests(row["input_output"]),
        )


def iter_seeds(source: Source | str, split: str = "train") -> Iterator[SeedProblem]:
    """Seed problems from a shipped corpus, in file order, read as they are asked for."""
    readers = {"gsm8k": _gsm8k, "codeforces": _codeforces}
    if source not in readers:
        raise ValueError(f"unknown seed source {source!r} (known: {sorted(readers)})")
    return readers[source](split)


def load_seeds(
    source: Source | str, split: str = "train", limit: int | None = None, skip: int = 0
) -> list[SeedProblem]:
    """Seed problems from a shipped corpus, in file order: ``skip`` leaves out the first N,
    ``limit`` takes the N after them."""
    seeds = iter_seeds(source, split)
    return list(islice(seeds, skip, None if limit is None else skip + limit))


def lexicon_annotations(seeds: list[SeedProblem], k: int = 5) -> list[tuple[str, list[str]]]:
    """(domain, concepts) per seed; seeds on which no concept fires are dropped."""
    pairs = [(s.domain, annotate_with_lexicon(s.text, s.domain, k)) for s in seeds]
    return [(domain, concepts) for domain, concepts in pairs if concepts]


def build_default_pool(
    embed: Callable[[list[str]], np.ndarray] | None = None,
    k: int = 5,
    embedder_name: str | None = None,
) -> ConceptPool:
    """The cold-start pool: GSM8K train (math) + Codeforces (code), annotated by the lexicon."""
    seeds = load_seeds("gsm8k", "train") + load_seeds("codeforces", "train")
    return ConceptPool.from_annotated(
        lexicon_annotations(seeds, k), embed=embed, embedder_name=embedder_name
    )
