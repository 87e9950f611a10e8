"""Metrics of a run: one JSON line per record (``metrics.jsonl``) and the same scalars in TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class RunLog:
    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def log(self, stage: str, step: int, metrics: dict) -> dict:
        """Append ``{"stage", "step", "time", **metrics}``; numbers also go to TensorBoard as stage/key."""
        record = {"stage": stage, "step": int(step), "time": time.time(), **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{stage}/{key}", value, step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
