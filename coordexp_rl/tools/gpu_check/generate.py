"""Step ``generate``: transformers-engine (``actors.hf_engine.HFEngine``) throughput at several batch sizes.

Random weights almost never write the end-of-turn token, so every request runs to ``max_new_tokens``:
the figures are decode throughput at a fixed length (images/s counts whole requests). Each batch size
gets one untimed warm-up call first on the GPU (CUDA kernels, allocator).
"""

from __future__ import annotations

from pathlib import Path

from coordexp_rl.tools.gpu_check.build import DATA, MAIN
from coordexp_rl.tools.gpu_check.common import Profile, Skip, Timer, peak_memory, require_cuda, reset_peak

PROMPT = "Detect all objects. For each, write its description and box."


def run(work: Path, p: Profile) -> dict:
    require_cuda(p)
    from PIL import Image

    from actors.hf_engine import HFEngine
    from coordexp_rl.rollout.engine import EngineConfig, GenerationRequest, SamplingConfig

    images = sorted((work / DATA / "images").glob("*.png"))
    if not (work / MAIN / "config.json").is_file() or not images:
        raise Skip(f"{work / MAIN} or its images are missing: the build_model step did not finish")
    dtype = "bfloat16" if p.device == "cuda" else "float32"
    with Timer() as t:
        engine = HFEngine(EngineConfig(model_path=str(work / MAIN), kind="hf", device=p.device, dtype=dtype))
    out: dict = {"device": p.device, "dtype": dtype, "max_new_tokens": p.gen_new_tokens, "load_s": round(t.s, 1),
                 "sampling": "greedy, repetition_penalty 1.0", "batches": []}
    pics = [Image.open(f).convert("RGB") for f in images]
    sampling = SamplingConfig(max_new_tokens=p.gen_new_tokens)
    for batch in p.gen_batches:
        requests = [GenerationRequest(pics[i % len(pics)], PROMPT, f"r{i}") for i in range(batch)]
        if p.gen_warmup:
            engine.generate(requests, sampling)
        reset_peak()
        with Timer() as t:
            results = engine.generate(requests, sampling)
        tokens = sum(len(r.generated_ids) for r in results)
        prompt_tokens = sum(len(r.prompt_ids) for r in results)
        out["batches"].append({"batch": batch, "seconds": round(t.s, 3), "images_per_s": round(batch / t.s, 2),
                               "tokens_per_s": round(tokens / t.s, 1), "generated_tokens": tokens,
                               "prompt_tokens": prompt_tokens, **(peak_memory() or {})})
    return out
