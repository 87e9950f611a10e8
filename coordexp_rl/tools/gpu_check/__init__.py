"""A prepared GPU check: the CUDA paths in one run of under 8 minutes, one JSON line per step.

``coordexp-rl gpu-check --out DIR [--cpu-dry-run] [--steps a b ...]`` (``deploy/gpu_check.sh`` wraps it for
the GPU machine). Steps, in order, each in its own process with its own time limit inside one overall
budget; a step that fails, times out or cannot run here is recorded and the next one starts:

1. ``env``: Python, torch / CUDA / NCCL / transformers versions, GPU name and memory, which packages exist;
2. ``unit_tests``: ``pytest -m gpu`` on the test files holding gpu-marked tests (CUDA vs CPU parity);
3. ``build_model``: a Qwen3-VL with Qwen3-VL-2B's shapes, random weights, real Qwen vocabulary + coord tokens;
4. ``train``: Stage-1 and Stage-2 learner steps (bf16 autocast, fp32 master weights) on transformers-engine
   rollouts, weight syncs into the engine; losses, steps/s, tokens/s, MFU, Stage-2's time by phase, peak memory;
5. ``bench_loss``: ``coordexp-rl bench loss --device cuda --dtype bfloat16`` at hidden 2048, chunks 256 and 1024;
6. ``train_compiled``: ``train``'s Stage-1 steps with learner.compile (the compile's cost and what it buys);
7. ``generate``: transformers-engine generation throughput at batch 1 / 8 / 64;
8. ``fsdp``: FSDP2 on a one-rank NCCL group and a checkpoint save / restore round trip.

``DIR/gpu_check.jsonl`` gets one line per step and a closing ``summary`` line (docs/DEPLOY.md explains
every field); ``DIR/gpu_check.log`` the steps' own output; ``DIR/pytest_gpu.xml`` the unit-test report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, time limit in seconds on the GPU) in run order. The dry run doubles them: 2 shared CPU cores
# are slower than the GPU machine at everything, and a dry run that times out tests nothing.
STEPS: list[tuple[str, int]] = [("env", 60), ("unit_tests", 150), ("build_model", 150), ("train", 180),
                                ("bench_loss", 180), ("train_compiled", 180), ("generate", 120), ("fsdp", 120)]
DRY_RUN_FACTOR = 2
DEFAULT_BUDGET_S = 540  # the device run's timeout is 580 s: 40 s left for start-up and the wheel install
DEFAULT_DRY_BUDGET_S = 900
MIN_STEP_S = 15  # a step is not started with less than this left of the budget
REPO = Path(__file__).resolve().parents[3]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for gpu_check.jsonl, gpu_check.log, pytest_gpu.xml")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the CPU-safe form of every step with the tiny model (float32, gloo)")
    parser.add_argument("--steps", nargs="+", choices=[s for s, _ in STEPS], help="run only these (in check order)")
    parser.add_argument("--budget-s", type=float, help=f"overall time limit in seconds (default {DEFAULT_BUDGET_S}, "
                        f"{DEFAULT_DRY_BUDGET_S} with --cpu-dry-run)")
    parser.add_argument("--work-dir", help="where the model folders go (kept); default: a temporary folder, removed")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.budget_s is None:
        args.budget_s = DEFAULT_DRY_BUDGET_S if args.cpu_dry_run else DEFAULT_BUDGET_S
    factor = DRY_RUN_FACTOR if args.cpu_dry_run else 1
    chosen = [(s, limit * factor) for s, limit in STEPS if not args.steps or s in args.steps]
    jsonl, log = out / "gpu_check.jsonl", out / "gpu_check.log"
    jsonl.write_text("")
    log.write_text("")
    start, lines = time.monotonic(), []
    try:
        for index, (step, limit) in enumerate(chosen, 1):
            left = args.budget_s - (time.monotonic() - start)
            line = run_step(step, index, min(limit, left), work, out, args.cpu_dry_run) if left >= MIN_STEP_S else \
                {"step": step, "index": index, "status": "skipped", "seconds": 0.0,
                 "reason": f"time budget spent ({args.budget_s:.0f} s, {left:.0f} s left)"}
            line["dry_run"] = args.cpu_dry_run
            lines.append(line)
            _append(jsonl, line)
            print(json.dumps({k: line.get(k) for k in ("step", "status", "seconds", "reason", "error")
                              if line.get(k) is not None}), flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(lines, time.monotonic() - start, args)
    _append(jsonl, summary)
    print(json.dumps(summary), flush=True)
    return 0 if summary["status"] == "ok" else 1


def run_step(step: str, index: int, limit: float, work: Path, out: Path, dry_run: bool) -> dict:
    """Run one step in a fresh process with a time limit; its JSON line (status, seconds, result or why not)."""
    result_file = work / f"result_{step}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "coordexp_rl.tools.gpu_check.worker", step, "--work", str(work), "--out", str(out),
           "--result", str(result_file)] + (["--cpu-dry-run"] if dry_run else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    line: dict = {"step": step, "index": index, "started_at": started, "timeout_s": round(limit)}
    t0 = time.monotonic()
    with open(out / "gpu_check.log", "a") as log:
        log.write(f"\n===== {step} ({started}) =====\n")
        log.flush()
        # A session of its own: on time-out the step and its children (pytest, bench workers) go together.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    line["seconds"] = round(time.monotonic() - t0, 2)
    if code is None:
        line.update(status="timeout", reason=f"killed after {limit:.0f} s (the step's limit within the budget)",
                    log_tail=_tail(out / "gpu_check.log", 1500))
    elif result_file.is_file():
        line.update(json.loads(result_file.read_text()))
    else:
        line.update(status="failed", error=f"the step's process exited {code} without a result "
                                           f"(crashed: see gpu_check.log)", log_tail=_tail(out / "gpu_check.log"))
    return line


def summarise(lines: list[dict], seconds: float, args: argparse.Namespace) -> dict:
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["status"]] = counts.get(line["status"], 0) + 1
    bad = counts.get("failed", 0) + counts.get("timeout", 0)
    return {"step": "summary", "status": "failed" if bad else "ok", "seconds": round(seconds, 1),
            "budget_s": args.budget_s, "counts": counts, "dry_run": args.cpu_dry_run,
            "steps": {line["step"]: line["status"] for line in lines}}


def _append(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:]
