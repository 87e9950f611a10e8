"""The real-shaped path on one CPU machine, as a user with a checkpoint would take it (docs/DEPLOY.md 8b).

1. `coordexp-rl make-tiny-model --shape qwen3vl-2b --tokenizer qwen --no-coord-tokens`: a random Qwen3-VL
   with Qwen3-VL-2B's vocabulary (151,936 rows, the real tokenizer), widths, heads and vision tower, and
   only ``--layers`` decoder / ``--vision-depth`` vision layers (a stock folder: no coord tokens).
2. `coordexp-rl add-coord-tokens` on it, as on a downloaded checkpoint.
3. `ray start --head` (token auth, 127.0.0.1) and `ray job submit -- python -m coordexp_rl.launch` with
   the tiny CPU config pointed at that folder: Stage-1, weight syncs to the vLLM CPU engine, Stage-2 steps.

Prints one JSON line: wall times, peak memory (the machine's used memory above its level before the job,
sampled every 0.5 s, so other work on the machine counts too), parameters, sync seconds and bytes.
Usage: `.venv/bin/python deploy/real_shaped_cpu.py [--layers 2] [--vision-depth 2] [--work /tmp/cx_shaped]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from coordexp_rl.tools.local_head import launch_job, local_ray_head, token_env  # noqa: E402

# A few steps of each stage; small batches: one step of a ~450 M-parameter model takes seconds on a core.
RUN = ["stage1.steps=4", "stage2.steps=4", "stage2.sync_every=2", "optim.batch_size=2", "optim.warmup_steps=1",
       "optim.lr=1e-4", "data.synth_train=64", "data.synth_val=8", "eval.max_samples=8", "rollout.batch_size=2",
       "rollout.max_new_tokens=48", "data.max_target_tokens=48", "buffer.capacity=8", "run.log_every=1",
       "run.keep_last=1"]


class PeakMemory:
    """The machine's used memory (total - available) above ``start``, sampled on a thread."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.base, self.peak = every_s, self.used(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def used() -> int:
        vm = psutil.virtual_memory()
        return vm.total - vm.available

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, self.used() - self.base)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**30, 2)


def timed(cmd: list[str], env: dict, log, check: bool = True) -> tuple[float, int]:
    """(seconds, exit code) of ``cmd``, its output appended to ``log``."""
    t0 = time.perf_counter()
    print("$", " ".join(cmd), file=log, flush=True)
    code = subprocess.run(cmd, env=env, check=check, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return round(time.perf_counter() - t0, 1), code


def sync_figures(run_dir: Path, model_dir: Path) -> dict:
    """Parameters and the bytes one full sync sends (every tensor in the engine's dtype: model.dtype)."""
    import yaml
    from safetensors import safe_open

    from coordexp_rl.rollout.weight_transport import dtype_from_name

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    syncs = [r["seconds"] for r in rows if r["stage"] == "sync"]
    dtype = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["dtype"]
    params = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            params += sum(math.prod(st.get_slice(key).get_shape()) for key in st.keys())
    return {"parameters": params, "engine_dtype": dtype, "sync_bytes": params * dtype_from_name(dtype).itemsize,
            "syncs": len(syncs), "sync_seconds": [round(s, 2) for s in syncs],
            "stage2_steps": sum(r["stage"] == "stage2" for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-VL-2B has 28)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision layers (Qwen3-VL-2B has 24)")
    parser.add_argument("--work", default="/tmp/cx_shaped", help="folder for the models, the run and the log")
    parser.add_argument("overrides", nargs="*", help="more launcher overrides")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = token_env(work, PYTHONPATH=str(ROOT), COORDEXP_CACHE=str(work / "cache"))
    stock, coord, run_dir = work / "stock", work / "coord", work / "run"
    cli = [sys.executable, "-m", "coordexp_rl.cli"]
    out: dict = {"layers": args.layers, "vision_depth": args.vision_depth}
    with open(work / "real_shaped.log", "a") as log:
        out["build_s"], _ = timed([*cli, "make-tiny-model", "--out", str(stock), "--shape", "qwen3vl-2b",
                                   "--tokenizer", "qwen", "--layers", str(args.layers), "--vision-depth",
                                   str(args.vision_depth), "--no-coord-tokens"], env, log)
        out["add_coord_tokens_s"], _ = timed([*cli, "add-coord-tokens", "--model", str(stock), "--out", str(coord)],
                                             env, log)
        with local_ray_head(env, num_cpus=os.cpu_count()) as address:
            job = launch_job(address, f"model.path={coord}", f"run.out_dir={run_dir}", *RUN, *args.overrides)
            memory = PeakMemory()
            out["job_s"], out["job_exit_code"] = timed(job, env, log, check=False)
            out["peak_memory_gib"] = memory.stop()
    out.update(sync_figures(run_dir, coord))  # also after a failed job: what it reached
    print(json.dumps(out))
    return out["job_exit_code"]


if __name__ == "__main__":
    sys.exit(main())
