"""Run control for the launcher: resume points, stopping on signals, the early-stop error.

Kept apart from ``coordexp_rl.driver.driver.Driver`` so the driver's main flow stays on one screen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import ray

log = logging.getLogger("coordexp_rl.launch")


class RunStopped(RuntimeError):
    """The run stopped early (a signal, or every rollout actor gone); a checkpoint to resume from exists."""

    def __init__(self, why: str, checkpoint: str, exit_code: int):
        super().__init__(f"{why}; checkpoint {checkpoint}")
        self.why, self.checkpoint, self.exit_code = why, checkpoint, exit_code


class Checkpoints:
    """The run's checkpoint folder: periodic saves (``run.checkpoint_every``), keep_last, the last step saved,
    and the checkpoints ``run.keep_last`` must not remove (``protected``: the best one, those being scored)."""

    def __init__(self, learner, folder: Path, every: int, keep_last: int):
        self.learner, self.folder, self.every, self.keep_last = learner, folder, every, keep_last
        self.last_step, self.last_path = -1, ""
        self.protected: set[str] = set()
        self.warned = False  # stop_wait_warning said once

    def save_if_due(self, step: int, driver_state: dict) -> None:
        if self.every and step % self.every == 0:
            self.save(step, driver_state)

    def save(self, step: int, driver_state: dict, name: str | None = None) -> str:
        target = self.folder / (name or f"step-{step:06d}")
        start = time.perf_counter()
        path = ray.get(self.learner.save_checkpoint.remote(str(target), self.keep_last, driver_state,
                                                           sorted(self.protected)))
        seconds = time.perf_counter() - start
        self.last_step, self.last_path = step, path
        log.info("checkpoint %s (%.1f s)", path, seconds)
        warning = stop_wait_warning(seconds)
        if warning and not self.warned:
            log.warning(warning)
            self.warned = True
        return path

    def ensure(self, step: int, driver_state: dict) -> str:
        """A checkpoint of ``step``: the one just saved, or a new one."""
        if self.last_step == step:
            return self.last_path
        return self.save(step, driver_state)


def stop_wait_seconds(checkpoint_s: float) -> int:
    """How long `ray job stop` must wait before its SIGKILL for a stop to end cleanly: the learner step in
    flight and the final checkpoint (each up to one checkpoint write, counted twice), plus 30 s of room."""
    return math.ceil(2 * checkpoint_s + 30)


def stop_wait_warning(checkpoint_s: float) -> str | None:
    """Under `ray job submit` (the job supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR in the driver's
    environment, beside the job's env_vars): a warning when Ray's stop wait, RAY_JOB_STOP_WAIT_TIME_S
    (default 3 s), would kill the final checkpoint mid-write; None otherwise."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return None
    wait, need = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", 3)), stop_wait_seconds(checkpoint_s)
    if wait >= need:
        return None
    return (f"a checkpoint took {checkpoint_s:.0f} s, but `ray job stop` kills the job after "
            f"RAY_JOB_STOP_WAIT_TIME_S={wait:g} s: set RAY_JOB_STOP_WAIT_TIME_S >= {need} in the job's runtime_env "
            "env_vars (deploy/runtime_env.yaml) so that a stop can write its checkpoint")


class BestCheckpoint:
    """``eval.best_metric``: the checkpoint of the best learning-curve point so far (higher is better), kept
    beyond ``run.keep_last`` and named in ``checkpoints/best.json``. Curve points are all scored on the same
    ``eval.every_samples`` images, so they compare. A point's checkpoint is saved when its scoring starts and
    protected until its score is in (scoring may run in a thread beside training)."""

    FILE = "best.json"

    def __init__(self, checkpoints: Checkpoints, metric: str):
        self.checkpoints, self.metric = checkpoints, metric
        self.scoring: dict[int, str] = {}  # step -> checkpoint path, score pending
        self._lock = threading.Lock()
        self.best: dict | None = None
        path = checkpoints.folder / self.FILE
        if path.is_file():  # a resumed run keeps its best
            self.best = json.loads(path.read_text())
            checkpoints.protected.add(self.best["path"])

    def saving_for(self, step: int, driver_state: dict) -> None:
        """Before a curve point is scored: its weights as a checkpoint, protected until the score is in."""
        path = self.checkpoints.ensure(step, driver_state)
        with self._lock:
            self.scoring[step] = path
            self.checkpoints.protected.add(path)

    def scored(self, label: str, step: int, headline: dict) -> None:
        """A score is in (any evaluation; only curve points with a saved checkpoint count)."""
        if self.metric not in headline:
            raise ValueError(f"eval.best_metric={self.metric!r} is not an evaluation metric; use one of "
                             f"{sorted(k for k, v in headline.items() if isinstance(v, (int, float)))}")
        with self._lock:
            path = self.scoring.pop(step, None)
            if path is None:
                return
            value = float(headline[self.metric])
            if self.best is None or value > self.best["value"]:
                if self.best is not None:
                    self.checkpoints.protected.discard(self.best["path"])
                self.best = {"metric": self.metric, "value": value, "step": step, "label": label, "path": path}
                (self.checkpoints.folder / self.FILE).write_text(json.dumps(self.best, indent=2) + "\n")
                log.info("best %s so far: %.4f at step %d (%s)", self.metric, value, step, path)
            else:
                self.checkpoints.protected.discard(path)


def load_resume_point(learner, resume: str, checkpoints: Path) -> dict:
    """Load ``resume`` (a checkpoint folder, ``auto`` = the newest complete one in ``checkpoints``, or ""
    = none) into the learner; returns {path, step, version, consumed, driver}, or {} for a fresh start."""
    path = resume
    if path == "auto":
        path = ray.get(learner.latest_checkpoint.remote(str(checkpoints)))
        if not path:
            log.info("run.resume=auto: no complete checkpoint in %s; starting fresh", checkpoints)
    if not path:
        return {}
    info = ray.get(learner.load_checkpoint.remote(path))
    return {"path": path, **info, **ray.get(learner.resumed_state.remote())}


@contextlib.contextmanager
def stop_on_signals(driver):
    """SIGINT / SIGTERM (Ctrl-C, `ray job stop`) ask the driver to stop after the learner call in flight:
    it then checkpoints, closes the buffer and raises RunStopped (see Driver.check_stop)."""
    def ask(signum, _frame):
        log.warning("%s received: stopping after the current step (checkpoint, then exit)",
                    signal.Signals(signum).name)
        driver.stop_signal = signum

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    driver.check_stop()  # a signal during the last step still stops before finishing


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = value
    return flat
