import pytest

from coordexp_rl.method.coords import COORD_TOKENS, STRUCTURE_TOKENS, CoordVocab


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2/3 vocabulary with the coord and structure tokens added (non-special)."""
    from transformers import AddedToken

    from coordexp_rl.modeling.tokenizer import load_qwen_tokenizer

    tok = load_qwen_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS + STRUCTURE_TOKENS])
    return tok


@pytest.fixture(scope="session")
def qwen_vocab(qwen_tokenizer):
    return CoordVocab.from_tokenizer(qwen_tokenizer)
