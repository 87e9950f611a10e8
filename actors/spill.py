"""Parquet spill files of the rollout buffer: every row handed to the learner, for replay and audit."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from coordexp_rl.rollout.schema import check_schema, concat_batches

SPILL_PATTERN = re.compile(r"rollouts-(\d{6})\.parquet")


class SpillWriter:
    """Appends handed-out rows to ``rollouts-NNNNNN.parquet`` files; numbering continues after old files.

    ``rows_per_file=0`` writes one file per batch; otherwise rows collect until a file holds that many
    (``flush`` writes the rest). Files appear atomically (written under a temporary name, then renamed).
    """

    def __init__(self, spill_dir: str | os.PathLike, rows_per_file: int = 0):
        self.dir = Path(spill_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self._pending: list[pa.RecordBatch] = []
        self._next = 1 + max((int(m.group(1)) for p in self.dir.iterdir()
                              if (m := SPILL_PATTERN.fullmatch(p.name))), default=-1)

    def write(self, batch: pa.RecordBatch) -> int:
        """Queue ``batch``; returns the number of files written now."""
        self._pending.append(batch)
        pending_rows = sum(b.num_rows for b in self._pending)
        return self.flush() if pending_rows >= max(1, self.rows_per_file) else 0

    def flush(self) -> int:
        if not self._pending:
            return 0
        path = self.dir / f"rollouts-{self._next:06d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_batches(self._pending), tmp)
        os.replace(tmp, path)
        self._next += 1
        self._pending = []
        return 1


def replay(spill_dir: str | os.PathLike) -> Iterator[pa.RecordBatch]:
    """Read spilled rows back in the order they were handed out: one checked batch per file."""
    paths = sorted(p for p in Path(spill_dir).iterdir() if SPILL_PATTERN.fullmatch(p.name))
    for path in paths:
        table = pq.read_table(path)
        check_schema(table.schema, where=str(path))
        yield concat_batches(table.to_batches())
