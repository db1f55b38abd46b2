"""Benchmarks, one harness: ``python -m bench`` (see bench/harness.py and bench/__main__.py)."""
