"""Shared fixtures for the engine tests: one tiny Qwen3-VL folder with non-degenerate weights.

A freshly initialised tiny model with tied embeddings greedily repeats its last prompt token ("\\n")
forever, which would make parity tests trivial. Adding N(0, 0.1^2) noise to every non-embedding matrix
gives image-dependent, varied outputs, so we write such weights into the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coordexp_rl.runtime import prepare_runtime

prepare_runtime()

PROMPT = "Detect all objects."
IMAGE_SIZES = [(96, 128), (128, 128), (64, 160)]  # (h, w): 12, 16 and 10 image tokens -> padding in HF


def perturbed(state: dict[str, torch.Tensor], seed: int, std: float = 0.1) -> dict[str, torch.Tensor]:
    """``state`` plus N(0, std^2) on every matrix except the (tied) embeddings."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + std * torch.randn(t.shape, generator=g) if t.dim() > 1 and "embed_tokens" not in n else t.clone()
            for n, t in state.items()}


def checkpoint_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model folder whose weights are the seed-0 model perturbed with seed 1."""
    from safetensors.torch import save_file

    from coordexp_rl.modeling.tiny import make_tiny_model

    out = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    save_file(perturbed(checkpoint_state(out), seed=1), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def hf_engine(tiny_dir):
    """The transformers engine on ``tiny_dir`` (one per test module: tests load other weights into it)."""
    from actors.engines import make_engine
    from coordexp_rl.rollout.engine import EngineConfig

    engine = make_engine(EngineConfig(str(tiny_dir), kind="hf"))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rs = np.random.RandomState(0)
    return [Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")) for h, w in IMAGE_SIZES]


@pytest.fixture(scope="session")
def requests_(images):
    from coordexp_rl.rollout.engine import GenerationRequest

    return [GenerationRequest(im, PROMPT, f"s{i}") for i, im in enumerate(images)]


def learner_logprobs(model, processor, image, prompt_text: str, generated_ids: list[int]) -> list[float]:
    """What the learner computes: a plain forward on prompt + generated ids, log-prob of each generated id."""
    from coordexp_rl.modeling.inputs import collate, encode_example

    enc = encode_example(processor, image, prompt_text, generated_ids)
    batch = collate([enc], pad_id=0)
    with torch.no_grad():
        logits = model(**batch).logits[0].float()  # (L, V)
    start = enc["prompt_len"]
    # logits at position t predict token t + 1
    lp = torch.log_softmax(logits[start - 1:-1], dim=-1)  # (T, V)
    return lp.gather(-1, torch.tensor(generated_ids).unsqueeze(-1)).squeeze(-1).tolist()
