"""GSM8K test split and a shared oracle fixture for the tests/test_mathcheck_*.py files."""

from __future__ import annotations

import json
import random

import corpora

GSM8K = corpora.path("gsm8k", "test.jsonl")
ROWS = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]


def gold_of(row: dict) -> str:
    return row["answer"].rsplit("####", 1)[1].strip()


def sample_golds(n: int, seed: int = 4) -> list[str]:
    return [gold_of(r) for r in random.Random(seed).sample(ROWS, n)]
