"""One step of the GPU check in its own process: ``python -m coordexp_rl.tools.gpu_check.worker STEP ...``.

A fresh process per step isolates failures (a CUDA error poisons its process's context), frees the GPU
between steps and gives each step clean peak-memory counters. The result goes to ``--result`` as JSON:
``{"status": "ok"|"skipped"|"failed", "result": {...}, "reason"/"error": ...}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from coordexp_rl.tools.gpu_check.common import Skip, profile, write_json


def call(step: str, work: Path, out_dir: Path, dry_run: bool) -> dict:
    """Run ``step``; Skip and exceptions become results (never raised)."""
    from coordexp_rl.tools.gpu_check import build, fsdp, generate, steps, train

    p = profile(dry_run)
    table = {
        "env": lambda: steps.env(work, p),
        "unit_tests": lambda: steps.unit_tests(work, p, out_dir),
        "build_model": lambda: build.run(work, p),
        "train": lambda: train.run(work, p),
        "bench_loss": lambda: steps.bench_loss(work, p),
        "train_compiled": lambda: train.run_compiled(work, p),
        "generate": lambda: generate.run(work, p),
        "fsdp": lambda: fsdp.run(work, p),
    }
    try:
        return {"status": "ok", "result": table[step]()}
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 -- recorded as the step's failure, the check goes on
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp_rl.tools.gpu_check.worker")
    parser.add_argument("step")
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()
    result = call(args.step, Path(args.work), Path(args.out), args.cpu_dry_run)
    write_json(Path(args.result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
