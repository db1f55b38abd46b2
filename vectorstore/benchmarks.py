"""Evaluation sets to decontaminate against, loaded from JSONL (shipped ones under corpora)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import corpora
from vectorstore.settings import BenchmarkSetSpec
from vectorstore.text import clean_problem_text


@dataclass(frozen=True)
class BenchmarkItem:
    id: str  # "<set>:<row>", e.g. "aime24:12" (row = 0-based line in the JSONL)
    text: str  # the problem statement, wrapper removed
    domain: str


def resolve_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else corpora.ROOT / path


def load_benchmark_set(spec: BenchmarkSetSpec) -> list[BenchmarkItem]:
    path = resolve_path(spec.path)
    items = []
    with path.open(encoding="utf-8") as lines:
        for row, line in enumerate(lines):
            if not line.strip():
                continue
            text = clean_problem_text(json.loads(line)[spec.text_field])
            if text:
                items.append(BenchmarkItem(f"{spec.name}:{row}", text, spec.domain))
    return items


def load_benchmarks(specs: Iterable[BenchmarkSetSpec]) -> list[BenchmarkItem]:
    return [item for spec in specs for item in load_benchmark_set(spec)]
