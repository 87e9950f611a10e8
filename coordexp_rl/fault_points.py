"""Fault injection points (``run.fail_at``): which process dies at which learner step, to rehearse recovery.

A point is ``ROLE@STAGE:STEP``: after the learner has taken step STEP of STAGE (counted from the stage's
start; a checkpoint due at that step is written first), the driver makes ROLE's process SIGKILL itself:
``learner`` (learner rank 0), ``buffer`` (the rollout buffer actor) or ``rollout`` (rollout-0). The driver
decides and records that a point fired, so a restarted process, a step replayed after a learner restart
or a resumed run never fires it again.

>>> parse_fault_point("learner@stage2:120")
FaultPoint(role='learner', stage='stage2', step=120)
>>> due([parse_fault_point("buffer@stage2:3")], "stage2", 3, fired={"buffer@stage2:3"})
[]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("learner", "buffer", "rollout")
FORMAT = "ROLE@STAGE:STEP with ROLE learner, buffer or rollout, STAGE stage1 or stage2, STEP >= 1"
_PATTERN = re.compile(r"(\w+)@(\w+):(\d+)")


@dataclass(frozen=True)
class FaultPoint:
    role: str  # learner | buffer | rollout
    stage: str  # stage1 | stage2
    step: int  # the stage's own step count, from 1

    @property
    def spec(self) -> str:
        return f"{self.role}@{self.stage}:{self.step}"


def parse_fault_point(spec: str) -> FaultPoint:
    """``"buffer@stage2:50"`` -> FaultPoint; ValueError naming the format otherwise."""
    m = _PATTERN.fullmatch(spec.strip())
    if not m:
        raise ValueError(f"{spec!r} is not {FORMAT}")
    role, stage, step = m.group(1), m.group(2), int(m.group(3))
    if role not in ROLES or stage not in ("stage1", "stage2") or step < 1:
        raise ValueError(f"{spec!r} is not {FORMAT}")
    if role != "learner" and stage == "stage1":  # the buffer and the actors' generation work in Stage-2 only
        raise ValueError(f"{spec!r}: a {role} fault needs stage2 (only the learner works in Stage-1)")
    return FaultPoint(role, stage, step)


def due(points: list[FaultPoint], stage: str, stage_step: int, fired: set[str]) -> list[FaultPoint]:
    """The points of ``stage`` at ``stage_step`` that have not fired yet."""
    return [p for p in points if p.stage == stage and p.step == stage_step and p.spec not in fired]
