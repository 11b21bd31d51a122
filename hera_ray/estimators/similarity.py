"""SBERT similarity on the bundled MiniLM (or any sentence-transformers folder by path).

Embeddings are cached per text (subtask predictions repeat across the stages of one decision),
and a batch of pairs is encoded in one call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from hera_ray.models import resolve_model


class SbertSimilarity:
    """Cosine similarity of sentence embeddings. ``model``: a bundled name or a folder path."""

    def __init__(self, model: str = "minilm-l6", device: str = "cpu", cache_size: int = 4096):
        from sentence_transformers import SentenceTransformer  # heavy: torch

        self.model = SentenceTransformer(str(resolve_model(model).path), device=device)
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size

    def _embed(self, texts: Sequence[str]):
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self.model.encode(missing, convert_to_tensor=True, normalize_embeddings=True,
                                        show_progress_bar=False)
            for text, vec in zip(missing, vectors):
                self._cache[text] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [self._cache[t] for t in texts]

    def similarities(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Cosine similarity of each (a, b) pair, in [-1, 1]."""
        if not pairs:
            return []
        left = self._embed([a for a, _ in pairs])
        right = self._embed([b for _, b in pairs])
        return [float((a * b).sum()) for a, b in zip(left, right)]

    async def similarity(self, a: str, b: str) -> float:
        return self.similarities([(a, b)])[0]
