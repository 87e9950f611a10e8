"""Fixtures of the inference tests.

A random tiny model almost never writes a valid record, so ``taught_dir`` holds a copy of the tiny model
fine-tuned (80 Adam steps, about 20 s on the CPU) to answer every image with the record of ``TAUGHT``.
With it the whole path (generate -> parse -> pixels / scores / CoordExp) runs on real objects, and the
taught tokens win greedy decoding by a wide margin (no near-ties between engines).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coordexp_rl.method.protocol import BoxObject
from coordexp_rl.runtime import prepare_runtime

prepare_runtime()

PROMPT = "Detect all objects."
# One record whose tokens are all different, so the next token follows from the current one (fast to fit).
TAUGHT = [BoxObject("red circle", (100, 200, 300, 400))]


def teach(model_dir: Path, out: Path, images, steps: int = 40, lr: float = 1e-2) -> Path:
    """Copy ``model_dir`` to ``out`` and fit its language model to answer ``TAUGHT`` to any image."""
    from safetensors.torch import load_file, save_file

    from coordexp_rl.method.protocol import build_assistant_ids
    from coordexp_rl.modeling.inputs import collate, encode_example
    from coordexp_rl.modeling.load import load_model_and_processor

    shutil.copytree(model_dir, out)
    model, processor, vocab = load_model_and_processor(out)
    target = build_assistant_ids(TAUGHT, processor.tokenizer, vocab)
    encs = [encode_example(processor, im, PROMPT, target) for im in images]
    batch = collate(encs, pad_id=0)
    start = encs[0]["prompt_len"]  # the images have one size, so every prompt has this length
    labels = torch.tensor(target).expand(len(encs), -1)  # (B, T)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if "visual" not in n], lr=lr)
    # Adam's decaying moments become subnormal floats, which make CPU kernels ~50x slower.
    torch.set_flush_denormal(True)
    try:
        for _ in range(steps):
            logits = model(**batch).logits[:, start - 1:-1]  # (B, T, V): position t-1 predicts token t
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    state = model.state_dict()
    names = load_file(str(out / "model.safetensors")).keys()  # a tied lm_head is not in the checkpoint
    save_file({n: state[n].detach().contiguous() for n in names}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def taught_dir(tiny_model_dir, synth_dir, tmp_path_factory) -> Path:
    from coordexp_rl.data.loader import load_image, load_samples

    train = load_samples(synth_dir / "train.jsonl")
    # 80 steps: at 40 the fit was marginal (a change of float rounding left 1 of 13 tokens wrong).
    return teach(tiny_model_dir, tmp_path_factory.mktemp("taught") / "model", [load_image(train[0])], steps=80)


def write_subset(synth_dir: Path, out: Path, n: int, split: str = "val") -> Path:
    """The first ``n`` lines of the synthetic split (image paths stay relative to ``synth_dir``)."""
    lines = (synth_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
