"""Shared fixtures. Models are local only: no hub at run time."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from tiny_model import tiny_model_dir as _tiny_model_dir
except ImportError:  # pragma: no cover
    from tests.tiny_model import tiny_model_dir as _tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny Llama trained on the project's prompt formats (built once, cached on disk).
    PROMPTCOT_TINY_MODEL_DIR points at a prebuilt one instead."""
    override = os.environ.get("PROMPTCOT_TINY_MODEL_DIR")
    return Path(override) if override else _tiny_model_dir()
