"""The data sets shipped with the factory (see README.md in this folder): GSM8K, the PromptCoT 2.0
evaluation sets, and the concept lexicon and pool. A leaf package: it imports nothing of the
project, so every layer may read from it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """A file or folder of the shipped data, e.g. ``path("gsm8k", "train.jsonl")``."""
    return ROOT.joinpath(*parts)
