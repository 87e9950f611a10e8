"""Metrics of a run: one JSON line per record (``metrics.jsonl``), and the same scalars and each evaluation
in the trackers of ``run.loggers`` (TensorBoard, W&B, MLflow: coordexp_rl/driver/trackers.py).

A resumed run rewinds the log to its checkpoint: ``RunLog(out, resume_step=k)`` keeps the records with
``step <= k`` (rewriting ``metrics.jsonl`` atomically) and TensorBoard hides events after ``k``
(``purge_step``), so the steps between the checkpoint and the crash, which run again, appear once. A learner
re-formed within a run rewinds the same way (``rewind``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from coordexp_rl.driver.trackers import numeric


class RunLog:
    def __init__(self, out_dir: Path, resume_step: int | None = None, trackers: list | None = None):
        """``trackers``: open trackers (trackers.open_trackers); closed with the log."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.kept: list[dict] = self._rewind(resume_step) if resume_step is not None else []
        self._file = self.path.open("a")
        self._lock = threading.Lock()  # the driver's evaluation thread logs beside its main loop
        self.trackers = trackers or []

    def _rewind(self, step: int) -> list[dict]:
        """Keep the records up to ``step`` (a torn last line from a kill is dropped too)."""
        if not self.path.exists():
            return []
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in kept))
        os.replace(tmp, self.path)
        return kept

    def rewind(self, step: int) -> None:
        """Within a run (the learner re-formed from the checkpoint of ``step``): keep the records up to it,
        as a resume does; TensorBoard hides its events past it too. W&B and MLflow cannot drop points: they
        get the steps taken again as second points (the ``fault`` record says how many)."""
        with self._lock:
            self._file.close()
            self._rewind(step)
            self._file = self.path.open("a")
            for tracker in self.trackers:
                tracker.rewind(step)

    def evaluations(self) -> dict[str, dict]:
        """The evaluations kept from before a resume: label -> headline metrics (``eval/`` prefix removed)."""
        return {r["label"]: {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
                for r in self.kept if r.get("stage") == "eval"}

    def evaluation_steps(self) -> dict[str, int]:
        """The step of each evaluation kept from before a resume: label -> step."""
        return {r["label"]: int(r["step"]) for r in self.kept if r.get("stage") == "eval"}

    def log(self, stage: str, step: int, metrics: dict) -> dict:
        """Append ``{"stage", "step", "time", **metrics}``; the numbers also go to the trackers as stage/key."""
        record = {"stage": stage, "step": int(step), "time": time.time(), **metrics}
        with self._lock:
            self._file.write(json.dumps(record, default=float) + "\n")
            self._file.flush()
            values = {f"{stage}/{k}": v for k, v in numeric(metrics).items()}
            for tracker in self.trackers:
                tracker.scalars(int(step), values)
        return record

    def evaluation(self, label: str, step: int, metrics: dict, folder: Path) -> None:
        """An evaluation's whole metrics and its outputs (``folder``: eval/<label>/) to the trackers."""
        with self._lock:
            for tracker in self.trackers:
                tracker.evaluation(label, int(step), metrics, Path(folder))

    def close(self) -> None:
        with self._lock:
            self._file.close()
            for tracker in self.trackers:
                tracker.close()
            self.trackers = []
