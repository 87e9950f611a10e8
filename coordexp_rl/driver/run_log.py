"""Metrics of a run: one JSON line per record (``metrics.jsonl``) and the same scalars in TensorBoard.

A resumed run rewinds the log to its checkpoint: ``RunLog(out, resume_step=k)`` keeps the records with
``step <= k`` (rewriting ``metrics.jsonl`` atomically) and tells TensorBoard to hide events after ``k``
(``purge_step``), so the steps between the checkpoint and the crash, which run again, appear once.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self.kept: list[dict] = self._rewind(resume_step) if resume_step is not None else []
        self._file = self.path.open("a")
        self._lock = threading.Lock()  # the driver's evaluation thread logs beside its main loop
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)

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

    def evaluations(self) -> dict[str, dict]:
        """The evaluations kept from before a resume: label -> headline metrics (``eval/`` prefix removed)."""
        return {r["label"]: {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}
                for r in self.kept if r.get("stage") == "eval"}

    def evaluation_steps(self) -> dict[str, int]:
        """The step of each evaluation kept from before a resume: label -> step."""
        return {r["label"]: int(r["step"]) for r in self.kept if r.get("stage") == "eval"}

    def log(self, stage: str, step: int, metrics: dict) -> dict:
        """Append ``{"stage", "step", "time", **metrics}``; numbers also go to TensorBoard as stage/key."""
        record = {"stage": stage, "step": int(step), "time": time.time(), **metrics}
        with self._lock:
            self._file.write(json.dumps(record, default=float) + "\n")
            self._file.flush()
            if self._tb is not None:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        self._tb.add_scalar(f"{stage}/{key}", value, step)
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
