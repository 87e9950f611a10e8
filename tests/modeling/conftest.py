"""Fixtures of the modeling tests (``tiny_model_dir`` is shared, in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2/3 tokenizer (no coord tokens); tests that add tokens must deep-copy it."""
    from coordexp_rl.modeling.tokenizer import load_qwen_tokenizer

    return load_qwen_tokenizer()
