"""The tiny folder in vLLM (in-process engine): loads, generates, and sees the same prompt ids as we do."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from coordexp_rl.modeling.inputs import collate, encode_prompt, render_prompt
from coordexp_rl.modeling.load import load_model_and_processor

pytestmark = pytest.mark.integration

PROMPT = "Find every shape."


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm  # after the environment above (a hard dependency: never skipped)

    engine = vllm.LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=1024, max_num_seqs=8,
                      enforce_eager=True, limit_mm_per_prompt={"image": 1, "video": 0},
                      distributed_executor_backend="uni", seed=0)
    yield engine
    del engine


def test_vllm_prompt_ids_equal_encode_prompt_and_logprobs_match_transformers(llm, tiny_model_dir):
    from vllm import SamplingParams

    model, processor, vocab = load_model_and_processor(tiny_model_dir)
    images = [Image.new("RGB", (128, 96), (200, 30, 30)), Image.new("RGB", (200, 160), (30, 30, 200))]
    requests = [{"prompt": render_prompt(processor, PROMPT), "multi_modal_data": {"image": im}} for im in images]
    outs = llm.generate(requests, SamplingParams(max_tokens=12, temperature=1.0, seed=0, logprobs=0))
    for image, out in zip(images, outs):
        enc = encode_prompt(processor, image, PROMPT)
        assert list(out.prompt_token_ids) == enc["input_ids"].tolist()
        gen = list(out.outputs[0].token_ids)
        assert len(gen) >= 1 and all(0 <= t < len(processor.tokenizer) for t in gen)
        # Transformers' log-probs of the tokens vLLM sampled equal vLLM's own (same weights, same inputs).
        enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor(gen)])
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(len(gen), dtype=torch.long)])
        with torch.no_grad():
            logits = model(**collate([enc], processor.tokenizer.pad_token_id)).logits[0]
        n = len(out.prompt_token_ids)
        hf = torch.log_softmax(logits[n - 1:-1], dim=-1).gather(1, torch.tensor(gen)[:, None])[:, 0]
        ours = torch.tensor([lp[t].logprob for t, lp in zip(gen, out.outputs[0].logprobs)])
        assert torch.allclose(hf, ours, atol=1e-4), (hf - ours).abs().max()
