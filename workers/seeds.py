"""Seed problems from the shipped corpora, and the default concept pool built from them.

- ``load_seeds("gsm8k", "train"|"test", limit)``: ``answer`` is the number after ``####``.
- ``load_seeds("codeforces", "train"|"all", limit)``: the one shipped file (408 problems). Its
  ``prompt`` wraps each statement in ChatML and an instruction preamble/trailer; ``text`` is the
  bare statement and ``tests`` the stdin/stdout pairs from ``input_output``.
- ``build_default_pool(embed=None)``: annotate GSM8K train + Codeforces with the lexicon
  (no LLM needed) and count concepts. ``python -m workers.seeds build-pool [--embed] [--out P]``
  regenerates ``workers/data/concepts/pool.json``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from streams.records import Domain, SeedProblem
from workers.concepts import ConceptPool, default_pool_path
from workers.data import data_dir
from workers.lexicon import annotate_with_lexicon

Source = Literal["gsm8k", "codeforces"]
SOURCE_DOMAIN: dict[str, Domain] = {"gsm8k": "math", "codeforces": "code"}

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
    for index, row in enumerate(_read_jsonl(data_dir() / "gsm8k" / f"{split}.jsonl")):
        yield SeedProblem(
            source="gsm8k",
            source_id=f"{split}-{index}",
            domain="math",
            text=row["question"].strip(),
            answer=gsm8k_final_answer(row["answer"]),
        )


def _codeforces(split: str) -> Iterator[SeedProblem]:
    # One shipped file; "train" is accepted because callers ask every source for its train split.
    if split not in ("train", "all"):
        raise ValueError(f"codeforces ships one split ('train' or 'all'), not {split!r}")
    for index, row in enumerate(_read_jsonl(data_dir() / "benchmarks" / "codeforces.jsonl")):
        yield SeedProblem(
            source="codeforces",
            source_id=str(index),
            domain="code",
            text=codeforces_statement(row["prompt"]),
            tests=codeforces_tests(row["input_output"]),
        )


def load_seeds(source: Source | str, split: str = "train", limit: int | None = None) -> list[SeedProblem]:
    """Seed problems from a shipped corpus, in file order (``limit`` takes the first N)."""
    readers = {"gsm8k": _gsm8k, "codeforces": _codeforces}
    if source not in readers:
        raise ValueError(f"unknown seed source {source!r} (known: {sorted(readers)})")
    seeds: list[SeedProblem] = []
    for seed in readers[source](split):
        if limit is not None and len(seeds) >= limit:
            break
        seeds.append(seed)
    return seeds


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
    return ConceptPool.from_annotated(lexicon_annotations(seeds, k), embed=embed, embedder_name=embedder_name)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.seeds")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-pool", help="annotate the shipped seeds and write the pool")
    build.add_argument("--out", type=Path, default=None, help="default: the shipped pool.json")
    build.add_argument("--embed", action="store_true", help="add all-MiniLM-L6-v2 concept embeddings")
    build.add_argument("-k", type=int, default=5, help="concepts per seed")
    args = parser.parse_args(argv)

    embed, name = None, None
    if args.embed:
        from vectorstore.embedder import Embedder  # heavy: only when asked

        embedder = Embedder()
        embed, name = embedder.embed, embedder.model_name
    pool = build_default_pool(embed=embed, k=args.k, embedder_name=name)
    out = args.out or default_pool_path()
    pool.save(out)
    for domain, stats in pool.summary().items():
        print(f"{domain}: {json.dumps(stats)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    _main()
