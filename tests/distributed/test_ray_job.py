"""The design card's way in: `ray start --head` on 127.0.0.1, then `ray job submit -- python -m coordexp_rl.launch`.

Ray 2.60 turns token authentication on by default; the cluster and the client share one token file
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), which is the choice documented in docs/DEPLOY.md.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from learner.distributed import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ray_head")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
           "COORDEXP_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    # A short temp dir: Ray's unix socket paths under it must stay below the 107-byte limit.
    temp_dir, port, dash = Path(tempfile.mkdtemp(prefix="cxray-", dir="/tmp")), free_port(), free_port()
    # A free job-agent port: another Ray on the machine may hold the default 52365 ("No available agent").
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                    f"--port={port}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
                    f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_for_job_agent(env, address)
        yield env, address
    finally:
        # `ray stop` would end every Ray process of the user; end only this cluster's (by its temp dir).
        for p in psutil.process_iter(["cmdline"]):
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                p.send_signal(signal.SIGTERM)
        time.sleep(2)
        for p in psutil.process_iter(["cmdline"]):
            if str(temp_dir) in " ".join(p.info["cmdline"] or []):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job_agent(env: dict, address: str, timeout_s: float = 120.0) -> None:
    """Right after `ray start` the dashboard answers before its job agent does ("No available agent")."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job agent at {address} did not answer within {timeout_s} s:\n{probe.stderr[-2000:]}")
        time.sleep(2)


SHORT_RUN = ["stage1.steps=4", "stage2.steps=4", "stage2.sync_every=2", "data.synth_train=32", "data.synth_val=8",
             "eval.max_samples=8", "rollout.max_new_tokens=48", "optim.batch_size=4"]


def submit(env: dict, dashboard: str, *overrides: str) -> str:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "deploy" / "runtime_env.yaml"), "--",
           "python", "-m", "coordexp_rl.launch", "--config", "configs/tiny_cpu.yaml", *SHORT_RUN, *overrides]
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    return logs


@pytest.mark.parametrize("overrides", [
    [],  # the default: object-store weight sync, one learner rank
    # the scale-out path: broadcast weight sync over gloo, two FSDP2 learner ranks (half a CPU each)
    ["weight_sync.transport=broadcast", "learner.world_size=2", "learner.cpus=0.5", "learner.sharding=fsdp"],
], ids=["object_store", "broadcast_fsdp2"])
def test_ray_job_submit_runs_both_stages_syncs_and_evaluates(ray_head, tmp_path, overrides):
    env, dashboard = ray_head
    out = tmp_path / "run"
    logs = submit(env, dashboard, f"run.out_dir={out}", *overrides)
    for line in ("stage1 done: 4 steps", "stage-2 done", "weight sync v1", "weight sync v3", "eval stage2"):
        assert line in logs, line
    assert (out / "report.md").read_text().count("| stage2 |") == 1
    for label in ("initial", "stage1", "stage2"):  # each evaluation leaves something to look at
        folder = out / "eval" / label
        assert (folder / "report.md").is_file() and (folder / "iou_histogram.png").is_file()
        assert len(list((folder / "overlays").glob("*.png"))) == 8
    stages = {line.split('"stage": "')[1].split('"')[0] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"stage1", "stage2", "sync", "eval", "rollout"} <= stages


def test_ray_job_submit_without_the_token_is_refused(ray_head):
    env, dashboard = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    job = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], env=env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    assert "authentication" in (job.stdout + job.stderr).lower()
