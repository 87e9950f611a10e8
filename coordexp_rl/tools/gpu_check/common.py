"""What the GPU check's steps share: the Skip signal, the sizes of each run, the model folders, timers.

Two profiles: ``gpu`` (a Qwen3-VL with Qwen3-VL-2B's shapes, bf16 autocast, NCCL) and ``dry`` (the tiny
CPU model, float32, gloo), so that ``--cpu-dry-run`` runs the very code the GPU run runs, only smaller.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Qwen3-VL-2B-Instruct's config.json (text: Qwen3-1.7B's decoder; vision: 24 blocks, deepstack 5/11/17),
# in modeling/tiny.py's TinySize fields. max_position_embeddings only sizes the rope cache.
QWEN3_VL_2B = dict(
    hidden=2048, layers=28, heads=16, head_dim=128, kv_heads=8, intermediate=6144, mrope_section=[24, 20, 20],
    vision_depth=24, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
    vision_position_embeddings=2304, deepstack=[5, 11, 17], max_position_embeddings=32768,
    tie_word_embeddings=True,
)
# The FSDP step's model: the 2B widths and vocabulary, 2 decoder layers and 2 vision blocks (518 M
# parameters, measured). Its checkpoint (fp32 weights + AdamW moments) is ~6 GB instead of the full
# model's ~25 GB, which would take minutes to write and read back; the sharding and checkpoint code do not
# depend on the depth.
QWEN3_VL_2B_SHALLOW = {**QWEN3_VL_2B, "layers": 2, "vision_depth": 2, "deepstack": [0, 1]}


class Skip(Exception):
    """A step (or part of one) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Profile:
    name: str
    device: str  # "cuda" or "cpu"
    model_sizes: dict  # TinySize overrides of the main model ({} = the tiny default)
    fsdp_sizes: dict  # TinySize overrides of the FSDP step's model
    tokenizer: str  # "qwen" (the real 151,669-token vocabulary) or "local"
    # Synthetic images are square, this many pixels a side; both profiles' images exceed the default
    # data.max_pixels (256 px a side), so a learner and engine that resize them differently fail the check.
    image_size: int
    n_images: int
    batch_size: int
    stage1_steps: int  # the first is a warm-up, not timed
    stage2_steps: int
    max_new_tokens: int  # Stage-2 rollouts
    gen_batches: tuple[int, ...]
    gen_new_tokens: int
    gen_warmup: bool  # one untimed call per batch size first (CUDA kernels, allocator); pointless on the CPU
    bench_hidden: int
    bench_objects: tuple[int, ...]
    bench_repeats: int
    chunk_size: int = 256  # loss.ce_chunk_size, the shipped default (configs/qwen3vl_2b_1node.yaml too)
    bench_chunk_sizes: tuple[int, ...] = (256,)  # bench_loss runs once per size
    # Stage-1 again at these batch sizes after Stage-2 (train's last part): whether the rate is bound by the
    # batch (it rises with it) or by per-step overheads; the GPU configs' batch is sized from it
    larger_batches: tuple[int, ...] = ()
    skipped_parts: list = field(default_factory=list)  # [{"part", "reason"}] this profile leaves out


GPU = Profile(
    name="gpu", device="cuda", model_sizes=QWEN3_VL_2B, fsdp_sizes=QWEN3_VL_2B_SHALLOW, tokenizer="qwen",
    image_size=448, n_images=16, batch_size=8, stage1_steps=4, stage2_steps=3, max_new_tokens=64,
    gen_batches=(1, 8, 64), gen_new_tokens=128, gen_warmup=True,
    bench_hidden=2048, bench_objects=(20, 100), bench_repeats=3,
    # the shipped chunk, and one that holds 20 objects' 300 positions whole (the naive path's three matmuls)
    bench_chunk_sizes=(256, 1024),
    larger_batches=(16, 32),
)
DRY = Profile(
    name="dry", device="cpu", model_sizes={}, fsdp_sizes={}, tokenizer="local",
    image_size=288, n_images=8, batch_size=4, stage1_steps=2, stage2_steps=2, max_new_tokens=16,
    gen_batches=(1, 8, 16), gen_new_tokens=16, gen_warmup=False,
    bench_hidden=128, bench_objects=(5,), bench_repeats=1, larger_batches=(8,),
    skipped_parts=[
        {"part": "CUDA, bf16 autocast, NCCL", "reason": "--cpu-dry-run: float32 on the CPU, gloo for FSDP"},
        {"part": "Qwen3-VL-2B shapes and the real Qwen vocabulary",
         "reason": "--cpu-dry-run: the tiny model (1.2 M parameters, local tokenizer)"},
    ],
)


def profile(dry_run: bool) -> Profile:
    return DRY if dry_run else GPU


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(*modules: str, why: str) -> None:
    """Skip unless every module imports (the GPU machine has no pydantic, Ray or vLLM of its own)."""
    missing = [m for m in modules if not has_module(m)]
    if missing:
        raise Skip(f"{', '.join(missing)} not importable ({why}); carry the wheels: "
                   "`bash deploy/gpu_check.sh --fetch-wheels` here, then `carry: [\".whl\"]` (docs/DEPLOY.md)")


def require_cuda(p: Profile) -> None:
    import torch

    if p.device == "cuda" and not torch.cuda.is_available():
        raise Skip("no CUDA device (torch.cuda.is_available() is False); --cpu-dry-run runs the CPU form")


class Timer:
    """``with Timer() as t: ...`` then ``t.s``; synchronises CUDA on both ends so GPU work is counted."""

    def __init__(self):
        self.t0 = self.s = 0.0

    def __enter__(self):
        _sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync()
        self.s = time.perf_counter() - self.t0


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float] | None:
    """Peak CUDA memory since the last ``reset_peak`` (GiB), or None off CUDA."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)}


def rounded(values: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in values.items()}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    tmp.replace(path)
