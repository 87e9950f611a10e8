"""A Ray head of one's own on this machine, for `ray job submit` as docs/DEPLOY.md 8 runs it (used by the
job-submit tests and deploy/real_shaped_cpu.py): token authentication, 127.0.0.1, free ports, and ended
by its own temp dir only (`ray stop` would end every Ray process of the user)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

RAY = str(Path(sys.executable).parent / "ray")  # the ray CLI of this environment
ROOT = Path(__file__).resolve().parents[2]  # the checkout a job's working dir is uploaded from


def token_env(folder: Path, **extra: str) -> dict:
    """This process's environment with a fresh auth token (written to ``folder``) and no RAY_ADDRESS:
    what the head and its clients share (Ray 2.60 turns token authentication on by default)."""
    token = Path(folder) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def local_ray_head(env: dict, num_cpus: int, info: dict | None = None, resources: dict | None = None,
                   jobs: bool = True) -> Iterator[str]:
    """`ray start --head`, wait until its job agent answers (``jobs``: for `ray job submit`; drivers that join
    by the GCS address need no agent), yield the dashboard address; on exit end this cluster's processes
    (nodes that joined it included). ``info`` gets the GCS address (``gcs``: what `ray start --address` and
    `ray.init` take) and the temp dir; ``resources``: custom resources of the head."""
    from learner.distributed import free_port

    # A short temp dir: Ray's unix socket paths under it must stay below the 107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="cxray-", dir="/tmp"))
    port, dash, agent = free_port(), free_port(), free_port()
    # The job agent's port too: another Ray on the machine may hold the default 52365 ("No available agent").
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                            f"--port={port}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                            f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                            *([f"--resources={json.dumps(resources)}"] if resources else [])],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        if start.returncode:
            raise RuntimeError(f"ray start --head failed ({start.returncode}):\n{start.stderr[-2000:]}")
        address = f"http://127.0.0.1:{dash}"
        if info is not None:
            info.update(gcs=f"127.0.0.1:{port}", temp_dir=temp_dir)
        if jobs:
            wait_for_job_agent(env, address)
        yield address
    finally:
        cluster = _cluster_processes(temp_dir, port)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in cluster:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(2)
        shutil.rmtree(temp_dir, ignore_errors=True)


def join_node(env: dict, gcs: str, num_cpus: int, resources: dict | None = None) -> psutil.Process:
    """A second raylet on this machine joins the cluster at ``gcs`` (as Ray's own multi-node tests do);
    returns its raylet process (``kill_node`` ends it; ``local_ray_head`` ends it with the cluster)."""
    before = {p.pid for p in _raylets(gcs)}
    joined = subprocess.run([RAY, "start", f"--address={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                             "--disable-usage-stats", *([f"--resources={json.dumps(resources)}"] if resources else [])],
                            env=env, capture_output=True, text=True, timeout=180)
    if joined.returncode:
        raise RuntimeError(f"ray start --address={gcs} failed ({joined.returncode}):\n{joined.stderr[-2000:]}")
    (raylet,) = [p for p in _raylets(gcs) if p.pid not in before]
    return raylet


def kill_node(raylet: psutil.Process) -> None:
    """The node lost at once (a spot reclaim, a hardware fault): SIGKILL to its raylet and everything under it
    (its agents, its workers and their engines)."""
    for p in [raylet, *raylet.children(recursive=True)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _raylets(gcs: str) -> list[psutil.Process]:
    """The raylets of the cluster at ``gcs`` (``host:port``; by the port: the head may name another IP)."""
    port, found = gcs.rsplit(":", 1)[1], []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and Path(cmd[0]).name == "raylet" and any(
                a.startswith("--gcs-address=") and a.endswith(f":{port}") for a in cmd):
            found.append(p)
    return found


def _cluster_processes(temp_dir: Path, port: int) -> list[psutil.Process]:
    """The head's processes and their descendants. Ray renames the ones the raylet starts
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and the client server names only the GCS port: left
    alive, the orphaned dashboard agent spins on a core."""
    mark = re.compile(rf"{re.escape(str(temp_dir))}|127\.0\.0\.1:{port}(?!\d)")  # not port 63790 for 6379
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if mark.search(" ".join(p.info["cmdline"] or [])):
            try:
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def wait_for_job_agent(env: dict, address: str, timeout_s: float = 120.0) -> None:
    """Right after `ray start` the dashboard answers before its job agent does ("No available agent")."""
    deadline = time.monotonic() + timeout_s
    while True:
        probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job agent at {address} did not answer within {timeout_s} s:\n"
                               f"{probe.stderr[-2000:]}")
        time.sleep(2)


def launch_job(address: str, *overrides: str) -> list[str]:
    """The `ray job submit` command (DEPLOY.md 8) that runs the launcher on the tiny CPU config plus
    ``overrides``, with this checkout as the job's working dir."""
    return [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--runtime-env",
            str(ROOT / "deploy" / "runtime_env.yaml"), "--", "python", "-m", "coordexp_rl.launch", "--config",
            "configs/tiny_cpu.yaml", *overrides]
