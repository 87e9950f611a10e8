"""Helpers for tests that run the real launcher (`python -m coordexp_rl.launch`) as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
# A few steps of each stage on 32 synthetic images; on-policy with a sync after every step, so each
# learner step trains on rows generated with the weights of the step before (deterministic, greedy).
SMALL_RUN = ["stage1.steps=2", "stage2.steps=5", "stage2.sync_every=1", "buffer.max_staleness=0",
             "data.synth_train=32", "data.synth_val=4", "eval.max_samples=4", "rollout.max_new_tokens=24",
             "data.max_target_tokens=48",  # GT sequences of up to 3 objects; rollouts stay short
             "optim.batch_size=2", "optim.warmup_steps=1", "run.checkpoint_every=2", "run.log_every=1",
             "buffer.spill_dir=spill"]


def prepare_cache(cache: Path) -> Path:
    """Build the SMALL_RUN's assets (tiny model, synthetic set) into ``cache`` now: runs started together
    would each build them, on the same two cores."""
    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import prepare_assets

    with pytest.MonkeyPatch.context() as env:
        env.setenv("COORDEXP_CACHE", str(cache))
        prepare_assets(load_config(None, SMALL_RUN))
    return cache


def start(out: Path, cache: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """``env``: the launcher's environment (default: this process's; e.g. a Ray head's auth token)."""
    env = {**(env or os.environ), "COORDEXP_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = open(out.parent / f"{out.name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "coordexp_rl.launch", *SMALL_RUN, f"run.out_dir={out}",
                             *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def output(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def finish(proc: subprocess.Popen, out: Path, timeout_s: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"the launcher did not finish in {timeout_s} s:\n{output(out)[-4000:]}") from None


def kill_tree(proc: subprocess.Popen) -> None:
    """End the launcher and the local Ray cluster it started (its own descendants only)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in [psutil.Process(proc.pid), *children]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def records(out: Path, stage: str | None = None) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r["stage"] == stage]


def wait_for_record(proc: subprocess.Popen, out: Path, stage: str, timeout_s: float = 400) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = records(out, stage)
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the launcher ended (rc {proc.returncode}) before a {stage} record:\n"
                                 f"{output(out)[-4000:]}")
        time.sleep(0.2)
    kill_tree(proc)
    raise AssertionError(f"no {stage} record within {timeout_s} s:\n{output(out)[-4000:]}")


def wait_until_all_in_stage2(procs: dict[str, subprocess.Popen], outs: dict[str, Path], steps: int,
                             timeout_s: float) -> None:
    """Until every run has ``steps`` Stage-2 records; fails with each run's output when one ends first or
    ``timeout_s`` passes (runs started together, faulted together: test_two_nodes, test_lost_learner_node)."""
    deadline = time.monotonic() + timeout_s
    while not all(len(records(out, "stage2")) >= steps for out in outs.values()):
        ended = [n for n, p in procs.items() if p.poll() is not None]
        assert not ended and time.monotonic() < deadline, "\n".join(
            f"{n}: rc {procs[n].returncode}\n{output(outs[n])[-3000:]}" for n in procs)
        time.sleep(0.2)
