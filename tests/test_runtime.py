"""prepare_runtime(): the torchvision op fallback and the environment defaults."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from coordexp_rl import runtime


def test_nms_kernel_hand_case():
    # Box 1 overlaps box 0 with IoU 81 / (100 + 100 - 81) = 0.68 > 0.5 -> suppressed by the higher-scored
    # box 0; box 2 is disjoint; box 3 overlaps box 2 with IoU 25 / 175 = 0.14 < 0.5 -> kept.
    dets = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [25, 25, 35, 35.]])
    scores = torch.tensor([0.9, 0.95, 0.7, 0.6])
    keep = runtime._nms_kernel(dets, scores, 0.5)
    assert keep.dtype == torch.long
    assert keep.tolist() == [1, 2, 3]  # decreasing score: box 1 (0.95) suppresses box 0
    assert runtime._nms_kernel(dets, scores, 0.1).tolist() == [1, 2]  # 0.14 > 0.1 now suppresses box 3
    assert runtime._nms_kernel(dets[:0], scores[:0], 0.5).tolist() == []


def test_environment_defaults_live_under_the_cache_dir(tmp_path):
    env = runtime.environment_defaults(tmp_path)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME"):
        assert Path(env[key]).parent == tmp_path


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COORDEXP_CACHE", str(tmp_path / "c"))
    assert runtime.cache_dir() == tmp_path / "c"


_CHILD = r"""
import os, sys
from coordexp_rl.runtime import prepare_runtime
prepare_runtime(); prepare_runtime()  # idempotent
import torch
import torchvision.transforms  # dies at import without the fallback on a CUDA torchvision wheel
from transformers import Qwen3VLProcessor  # needs torchvision's transforms (video processor)
keep = torch.ops.torchvision.nms(torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11.]]), torch.tensor([0.9, 0.8]), 0.5)
print(keep.tolist(), os.environ["VLLM_CPU_KVCACHE_SPACE"], os.environ["HF_HOME"])
"""


def test_fresh_process_imports_torchvision_and_qwen3vl_processor(tmp_path):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "3", "COORDEXP_CACHE": str(tmp_path)}
    env.pop("HF_HOME", None)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    keep, kv, hf_home = out.stdout.split("]")[0] + "]", *out.stdout.split("]")[1].split()
    assert keep == "[0]"
    assert kv == "3"  # a caller's own setting wins over the default
    assert hf_home == str(tmp_path / "hf")
