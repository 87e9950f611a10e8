"""``run.fail_at`` in the driver: at a point's step, the named process SIGKILLs itself (its ``fail_now``).

The driver decides and records: each point fires once per run, written to ``faults.json`` in the run
folder before it fires, so neither a restarted process, nor a step replayed after a learner restart, nor
a resumed run (``run.resume=auto``) fires it again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray

from coordexp_rl.fault_points import due, parse_fault_point

log = logging.getLogger("coordexp_rl.launch")


class FaultInjector:
    FILE = "faults.json"

    def __init__(self, specs: list[str], out: Path):
        self.points = [parse_fault_point(s) for s in specs]
        self.path = Path(out) / self.FILE
        self.fired: list[str] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def fire_due(self, stage: str, stage_step: int, targets: dict) -> list[str]:
        """Kill the process of each point due at ``stage_step`` of ``stage``; ``targets``: role -> an actor
        handle with ``fail_now``. Returns the points fired; each is dead when this returns."""
        fired = []
        for point in due(self.points, stage, stage_step, set(self.fired)):
            self.fired.append(point.spec)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.fired) + "\n")
            os.replace(tmp, self.path)
            log.warning("run.fail_at=%s: SIGKILL of the %s's process now", point.spec, point.role)
            ref = targets[point.role].fail_now.remote()
            try:
                ray.get(ref, timeout=300)  # a rollout actor dies after the generation step it has running
            except Exception:  # noqa: BLE001 -- the call dies with its process: that is the point
                pass
            fired.append(point.spec)
        return fired
