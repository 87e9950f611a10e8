"""Fixtures of the modeling tests. ``tiny_model_dir`` is meant to move to tests/conftest.py (shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordexp_rl.runtime import prepare_runtime

prepare_runtime()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Qwen3-VL folder (seed 0, local tokenizer, coord tokens), built once per session."""
    from coordexp_rl.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2/3 tokenizer (no coord tokens); tests that add tokens must deep-copy it."""
    from coordexp_rl.modeling.tokenizer import load_qwen_tokenizer

    return load_qwen_tokenizer()
