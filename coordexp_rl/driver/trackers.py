"""Experiment trackers beside metrics.jsonl (``run.loggers``): TensorBoard, Weights & Biases, MLflow.

Each tracker receives, when it opens, the resolved config (dotted keys) and the git commit; then every
numeric metric the run log writes, as ``<stage>/<key>`` at its learner step; and after each evaluation its
metrics table and box overlays (``eval/<label>/``). metrics.jsonl stays the run's own record (resume,
report.md, plots and ``ablate`` read it).

W&B and MLflow run through their own libraries and honour their usual environment: ``WANDB_MODE=offline``,
``WANDB_DIR``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``. Without it W&B writes
under the run folder (``wandb/``), and MLflow into an SQLite file there (``mlflow.db``, artifacts in
``mlartifacts/``), so that nothing leaves the machine unless asked. A resumed run continues the same
tracker runs (their ids in ``trackers.json``); W&B shows the metrics against ``learner_step`` (evaluations
run in a thread and arrive out of step order, which W&B's own step would drop).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from coordexp_rl.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
IDS_FILE = "trackers.json"
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> module (and pip package) it needs
OVERLAYS = 16  # overlay images sent per evaluation


def check_installed(loggers: list[str]) -> None:
    """Refuse, before any work, a logger whose library is missing, naming what to install."""
    for name in loggers:
        module = PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.loggers includes {name}, but the {module} package is not installed: "
                              f"`pip install {module}` (or `pip install -e '.[track]'`)")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of ``metrics`` (bools and text left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    def __init__(self, out: Path, resume_step: int | None):
        self.folder = out / "tb"
        self.writer = self._open(resume_step)

    def _open(self, rewound_to: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # After a resume or a re-formed learner, the events past the checkpoint are hidden (they run again).
        return SummaryWriter(str(self.folder), purge_step=None if rewound_to is None else rewound_to + 1)

    def rewind(self, step: int) -> None:
        self.writer.close()
        self.writer = self._open(step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def evaluation(self, label: str, step: int, metrics: dict, folder: Path) -> None:
        pass  # its scalars came through scalars(); tables and images stay in eval/<label>/

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, config: dict, run_id: str | None):
        import wandb

        self.wandb = wandb
        folder = Path(os.environ.get("WANDB_DIR") or out)  # read here: W&B reads its environment once a process
        folder.mkdir(parents=True, exist_ok=True)  # W&B falls back to a temporary folder when it does not exist
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "coordexp-rl"), name=out.name,
                              dir=str(folder), mode=os.environ.get("WANDB_MODE"), config=config,
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(console="off", quiet=True))
        self.run.define_metric("learner_step")
        self.run.define_metric("*", step_metric="learner_step")
        self.run_id = self.run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"learner_step": step, **values})

    def evaluation(self, label: str, step: int, metrics: dict, folder: Path) -> None:
        rows = [[k, v] for k, v in sorted(numeric(metrics).items())]
        logged: dict[str, Any] = {"learner_step": step,
                                  f"eval/{label}/table": self.wandb.Table(columns=["metric", "value"], data=rows)}
        overlays = sorted((folder / "overlays").glob("*.png"))[:OVERLAYS]
        if overlays:
            logged[f"eval/{label}/overlays"] = [self.wandb.Image(str(p), caption=p.stem) for p in overlays]
        self.run.log(logged)

    def rewind(self, step: int) -> None:
        pass  # W&B cannot drop logged points: the steps taken again appear a second time (fault/steps_lost)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    # MLflow's metric and param names allow letters, digits, _ - . / space and colon
    UNSAFE = re.compile(r"[^\w\-./ :]")

    def __init__(self, out: Path, config: dict, run_id: str | None, commit: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}" if own_store else None)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "coordexp-rl")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=(out.resolve() / "mlartifacts").as_uri() if own_store else None)
        if run_id is None:
            run_id = self.client.create_run(experiment, run_name=out.name,
                                            tags={"git_commit": commit, "run_folder": str(out.resolve())}).info.run_id
            params = [Param(self.name(k), str(v)[:6000]) for k, v in config.items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:  # a resume: the params stay those of the start (MLflow refuses changed ones); say where it went on
            self.client.set_tag(run_id, f"resumed_{int(time.time())}", commit)
        self.run_id = run_id

    def name(self, key: str) -> str:
        return self.UNSAFE.sub("_", key)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self.name(k), v, now, step) for k, v in values.items()])

    def evaluation(self, label: str, step: int, metrics: dict, folder: Path) -> None:
        self.client.log_dict(self.run_id, {"step": step, **metrics}, f"eval/{label}/metrics.json")
        if (folder / "overlays").is_dir():
            self.client.log_artifacts(self.run_id, str(folder / "overlays"), f"eval/{label}/overlays")

    def rewind(self, step: int) -> None:
        pass  # MLflow keeps every value of a step: the steps taken again are a second value at each (fault/steps_lost)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(loggers: list[str], out: Path, config: dict, resume_step: int | None) -> list:
    """The trackers of ``run.loggers`` (jsonl is the run log itself), continuing those of a resumed run."""
    check_installed(loggers)
    ids_file = out / IDS_FILE
    ids = json.loads(ids_file.read_text()) if resume_step is not None and ids_file.exists() else {}
    commit = git_commit()
    trackers: list = [TensorBoard(out, resume_step)] if "tensorboard" in loggers else []
    if "wandb" in loggers:
        trackers.append(Wandb(out, {**config, "git_commit": commit}, ids.get("wandb")))
        ids["wandb"] = trackers[-1].run_id
    if "mlflow" in loggers:
        trackers.append(Mlflow(out, config, ids.get("mlflow"), commit))
        ids["mlflow"] = trackers[-1].run_id
    if ids:
        ids_file.write_text(json.dumps(ids, indent=2) + "\n")
    return trackers
