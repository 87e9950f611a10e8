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
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
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


def timed(cmd: list[str], env: dict, log) -> float:
    t0 = time.perf_counter()
    print("$", " ".join(cmd), file=log, flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return round(time.perf_counter() - t0, 1)


def ray_head(env: dict, temp_dir: Path, log) -> str:
    from learner.distributed import free_port

    port, dash, agent = free_port(), free_port(), free_port()
    # The job agent's port too: another Ray on the machine (a local `ray.init`) may hold the default 52365,
    # and then every `ray job submit` answers "No available agent".
    timed([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={port}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
           f"--temp-dir={temp_dir}", f"--num-cpus={os.cpu_count()}", "--disable-usage-stats"], env, log)
    address = f"http://127.0.0.1:{dash}"
    for _ in range(60):  # the dashboard answers before its job agent does
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, timeout=120)
        if probe.returncode == 0:
            return address
        time.sleep(2)
    raise TimeoutError(f"no job agent at {address}")


def stop_cluster(temp_dir: Path) -> None:
    """End this cluster's processes only (`ray stop` would end every Ray of the user)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in psutil.process_iter(["cmdline"]):
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                p.send_signal(sig)
        time.sleep(2)


def sync_figures(run_dir: Path, model_dir: Path) -> dict:
    from safetensors import safe_open

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    syncs = [r["seconds"] for r in rows if r["stage"] == "sync"]
    params = nbytes = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                t = st.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                params += n
                nbytes += n * 4  # float32 on the CPU engine: what each sync sends
    return {"parameters": params, "sync_bytes": nbytes, "syncs": len(syncs),
            "sync_seconds": [round(s, 2) for s in syncs], "stage2_steps": sum(r["stage"] == "stage2" for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen3-VL-2B has 28)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision layers (Qwen3-VL-2B has 24)")
    parser.add_argument("--work", default="/tmp/cx_shaped", help="folder for the models, the run and the log")
    parser.add_argument("overrides", nargs="*", help="more launcher overrides")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": str(ROOT),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
           "COORDEXP_CACHE": str(work / "cache")}
    env.pop("RAY_ADDRESS", None)
    stock, coord, run_dir = work / "stock", work / "coord", work / "run"
    cli = [sys.executable, "-m", "coordexp_rl.cli"]
    out: dict = {"layers": args.layers, "vision_depth": args.vision_depth}
    with open(work / "real_shaped.log", "a") as log:
        out["build_s"] = timed([*cli, "make-tiny-model", "--out", str(stock), "--shape", "qwen3vl-2b", "--tokenizer",
                                "qwen", "--layers", str(args.layers), "--vision-depth", str(args.vision_depth),
                                "--no-coord-tokens"], env, log)
        out["add_coord_tokens_s"] = timed([*cli, "add-coord-tokens", "--model", str(stock), "--out", str(coord)],
                                          env, log)
        temp_dir = Path(f"/tmp/cxray-shaped-{os.getpid()}")  # short: Ray's socket paths have a length limit
        try:
            address = ray_head(env, temp_dir, log)
            memory = PeakMemory()
            out["job_s"] = timed([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
                                  "--runtime-env", str(ROOT / "deploy" / "runtime_env.yaml"), "--", "python", "-m",
                                  "coordexp_rl.launch", "--config", "configs/tiny_cpu.yaml", f"model.path={coord}",
                                  f"run.out_dir={run_dir}", *RUN, *args.overrides], env, log)
            out["peak_memory_gib"] = memory.stop()
        finally:
            stop_cluster(temp_dir)
    out.update(sync_figures(run_dir, coord))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
