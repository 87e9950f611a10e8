"""Where a learner step's time goes: forward, backward, optimizer (the ``time/*`` step metrics).

On a GPU each phase ends at a CUDA event on the current stream, and the events are read once, when the
step is over: timing adds no synchronisation (the step already waits for the device to read its gradient
norm back), so the phases are what the device spent, not when the host queued the work. On the CPU they
are host clock readings.
"""

from __future__ import annotations

import time

import torch


class PhaseTimer:
    """``mark(phase)`` ends a phase (the time since the previous mark, or since the timer was made, goes to
    ``phase``; a phase marked again adds up); ``seconds()`` sums them per phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self._now()
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        out: dict[str, float] = {}
        previous = self.start
        for phase, now in self.marks:
            dt = previous.elapsed_time(now) / 1000 if self.cuda else now - previous
            out[phase] = out.get(phase, 0.0) + dt
            previous = now
        return out
