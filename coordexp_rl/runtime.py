"""Process setup that every entry point and Ray actor runs first: ``prepare_runtime()``.

Three things (the measured facts behind the first two: docs/PLATFORM.md):

1. The torchvision fix. On CPU machines PyPI's torchvision wheel is a CUDA build whose compiled ``_C``
   library fails to load beside ``torch+cpu``; torchvision then dies at import on
   ``register_fake("torchvision::nms")`` because the op was never defined. transformers' and vLLM's
   Qwen3-VL processors need torchvision's pure-Python transforms, so when (and only when) ``_C`` fails
   to load we define the two op schemas it registers fakes for, with a plain-torch CPU kernel.
2. Environment defaults (``os.environ.setdefault``, so a caller's own settings win) for vLLM's CPU
   backend, offline Hugging Face use, Ray's local binding, and caches under one project cache dir.
3. In the Ray actors of a quiet launch (``WORKER_LOG_DIR`` set on them: coordexp_rl/driver/console.py),
   the process's stdout and stderr, engine and C-level output included, go to a file in the run folder.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Kept alive for the life of the process: dropping the Library object would remove the op definitions.
_TORCHVISION_LIB: torch.library.Library | None = None
_PREPARED = False
WORKER_LOG_DIR = "COORDEXP_WORKER_LOG_DIR"  # set on a quiet launch's actors: where their output goes


def cache_dir() -> Path:
    """The project cache dir: ``$COORDEXP_CACHE`` or ``~/.cache/coordexp_rl``."""
    return Path(os.environ.get("COORDEXP_CACHE") or Path.home() / ".cache" / "coordexp_rl").expanduser()


def environment_defaults(root: Path | None = None) -> dict[str, str]:
    """The variables ``prepare_runtime`` sets when absent (values as strings)."""
    root = cache_dir() if root is None else root
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on the CPU backend; the default (4+) is too much here
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # 2 shared cores: pinning threads fights other processes
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: 3 s start and 1.7 GB instead of 15 s, 3 GB
        "HF_HUB_OFFLINE": "1",  # no hub on these machines; fail fast instead of retrying the network
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # without it Ray binds the external interface
        "TOKENIZERS_PARALLELISM": "false",  # the Rust pool deadlocks after fork (Ray workers, DataLoader)
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "HF_HOME": str(root / "hf"),
    }


def prepare_runtime() -> None:
    """Idempotent process setup; call before importing torchvision, transformers' processors or vLLM."""
    global _PREPARED
    if _PREPARED:
        return
    for key, value in environment_defaults().items():
        os.environ.setdefault(key, value)
    install_torchvision_fallback()
    send_output_to_log_dir()
    _PREPARED = True


def send_output_to_log_dir() -> Path | None:
    """With ``WORKER_LOG_DIR`` set: this process's file descriptors 1 and 2 (Python, engine and C-level
    output alike) onto ``<dir>/worker-<pid>.log``; returns that file (None when unset)."""
    folder = os.environ.get(WORKER_LOG_DIR)
    if not folder:
        return None
    path = Path(folder) / f"worker-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def install_torchvision_fallback() -> bool:
    """Define ``torchvision::nms``/``qnms`` with a CPU kernel if torchvision's ``_C`` cannot load.

    Returns True when the fallback was installed (now or earlier). Does nothing when torchvision is
    absent, already imported, or its own library loads (then its real ops are used).
    """
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None:
        return True
    if "torchvision" in sys.modules or _has_op("nms"):
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = [p for d in spec.submodule_search_locations for p in glob.glob(os.path.join(d, "_C.*"))
            if p.endswith((".so", ".pyd", ".dylib"))]
    try:
        if not libs:
            raise OSError("no _C library in the torchvision package")
        torch.ops.load_library(libs[0])  # torchvision loads it again later; loading twice is a no-op
        return False
    except (OSError, ImportError, RuntimeError) as exc:
        log.info("torchvision's _C did not load (%s); defining torchvision::nms/qnms in plain torch", exc)
    lib = torch.library.Library("torchvision", "DEF")
    for name, fn in (("nms", _nms_kernel), ("qnms", _qnms_kernel)):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl(name, fn, "CPU")
    _TORCHVISION_LIB = lib
    return True


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _nms_kernel(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices (int64) of kept boxes in decreasing score order. dets (N, 4) x1y1x2y2."""
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = dets[order].to(torch.float64)  # (N, 4)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        iou = inter / (area[i] + area - inter)
        suppressed |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _qnms_kernel(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return _nms_kernel(dets.dequantize(), scores.dequantize(), iou_threshold)
