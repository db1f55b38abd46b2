"""Public data sets shipped with the factory (see README.md in this folder)."""

from pathlib import Path


def data_dir() -> Path:
    """The folder holding the shipped data sets (gsm8k/, benchmarks/)."""
    return Path(__file__).resolve().parent
