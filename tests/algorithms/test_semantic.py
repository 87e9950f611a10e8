"""Semantic distances for the matching cost: normalised text and the frozen MiniLM encoder."""

import numpy as np
import pytest

from coordexp_rl.method.semantic import (
    MiniLMDistance,
    make_semantic_distance,
    normalise_text,
    text_distance,
    text_distance_matrix,
)


def test_normalise_and_text_distance_by_hand():
    assert normalise_text("  A Black-Cat!  ") == "a black cat"
    assert text_distance("Black cat", "black   cat.") == 0.0
    assert text_distance("black cat", "black dog") == pytest.approx(1 - 1 / 3)  # {black} / {black, cat, dog}
    assert text_distance("cat", "dog") == 1.0
    d = text_distance_matrix(["cat", "dog"], ["dog", "cat", "a cat"])
    np.testing.assert_allclose(d, [[1, 0, 0.5], [0, 1, 1]])
    assert text_distance_matrix([], ["cat"]).shape == (0, 1)


def test_factory():
    assert make_semantic_distance("text") is text_distance_matrix
    assert isinstance(make_semantic_distance("minilm"), MiniLMDistance)
    with pytest.raises(ValueError, match="unknown semantic back-end"):
        make_semantic_distance("clip")


@pytest.fixture(scope="module")
def minilm():
    return MiniLMDistance()


def test_minilm_distances_are_semantic(minilm):
    d = minilm(["kitten", "truck"], ["cat", "lorry", "kitten"])
    assert d.shape == (2, 3) and ((0 <= d) & (d <= 1)).all()
    assert d[0, 2] == pytest.approx(0.0, abs=1e-6)  # same string
    assert d[0, 0] < d[0, 1]  # kitten is closer to cat than to lorry
    assert d[1, 1] < d[1, 0]  # truck is closer to lorry than to cat


def test_minilm_caches_embeddings(minilm):
    minilm(["black cat"], ["yellow dog"])
    n = len(minilm._cache)
    minilm(["yellow dog", "black cat"], ["black cat"])
    assert len(minilm._cache) == n  # nothing new encoded
    assert minilm([], ["cat"]).shape == (0, 1)
