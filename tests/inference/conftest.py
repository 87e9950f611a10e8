"""Fixtures of the inference tests.

A random tiny model almost never writes a valid record, so ``taught_dir`` holds a copy of the tiny model
fine-tuned (a few seconds of Adam on the CPU) to answer every image with the two fixed records of
``TAUGHT``. With it, the whole path (generate -> parse -> pixels / scores / CoordExp) runs on real
objects, and greedy ties are unlikely because the taught tokens win by a wide margin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from coordexp_rl.protocol import BoxObject
from coordexp_rl.runtime import prepare_runtime

prepare_runtime()

PROMPT = "Detect all objects."
TAUGHT = [BoxObject("red circle", (100, 200, 300, 400)), BoxObject("blue square", (500, 50, 900, 700))]


def teach(model_dir: Path, out: Path, images, steps: int = 30, lr: float = 2e-2) -> Path:
    """Copy ``model_dir`` to ``out`` and fit it to answer ``TAUGHT`` (CE on the assistant tokens)."""
    from safetensors.torch import load_file, save_file

    from coordexp_rl.modeling.inputs import collate, encode_example
    from coordexp_rl.modeling.load import load_model_and_processor
    from coordexp_rl.protocol import build_assistant_ids

    shutil.copytree(model_dir, out)
    model, processor, vocab = load_model_and_processor(out)
    target = build_assistant_ids(TAUGHT, processor.tokenizer, vocab)
    encs = [encode_example(processor, im, PROMPT, target) for im in images]
    batch = collate(encs, pad_id=0)
    start = encs[0]["prompt_len"]
    labels = torch.tensor(target).expand(len(encs), -1)  # (B, T); all prompts have the same length
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        logits = model(**batch).logits[:, start - 1:-1]  # (B, T, V): position t-1 predicts token t
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = load_file(str(out / "model.safetensors")).keys()
    state = model.state_dict()
    save_file({n: state[n].detach().contiguous() for n in names}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out
