"""The run log rewinds to a resumed checkpoint: no step twice, finished evaluations kept."""

from __future__ import annotations

import json

from coordexp_rl.driver.run_log import RunLog
from coordexp_rl.driver.trackers import TensorBoard


def test_resume_rewinds_metrics_and_keeps_earlier_evaluations(tmp_path):
    first = RunLog(tmp_path)
    first.log("eval", 0, {"label": "initial", "eval/mean_iou": 0.1})
    for step in range(1, 6):
        first.log("stage1", step, {"loss/total": float(step)})
    first.log("eval", 5, {"label": "stage1", "eval/mean_iou": 0.3})
    first.log("stage2", 6, {"loss/total": 6.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "stage2", "step": 7, "lo')  # killed in the middle of a write

    resumed = RunLog(tmp_path, resume_step=5)
    assert resumed.evaluations() == {"initial": {"mean_iou": 0.1}, "stage1": {"mean_iou": 0.3}}
    resumed.log("stage2", 6, {"loss/total": 6.5})  # the step after the checkpoint runs again
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [
        ("eval", 0), *[("stage1", s) for s in range(1, 6)], ("eval", 5), ("stage2", 6)]
    assert records[-1]["loss/total"] == 6.5


def test_tensorboard_hides_events_after_the_resume_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLog(tmp_path, trackers=[TensorBoard(tmp_path, None)])
    for step in range(1, 5):
        first.log("stage1", step, {"loss": float(step)})
    first.close()
    resumed = RunLog(tmp_path, resume_step=2, trackers=[TensorBoard(tmp_path, 2)])
    resumed.log("stage1", 3, {"loss": 30.0})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("stage1/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_rewind_within_a_run_keeps_each_step_once_in_the_log_and_in_tensorboard(tmp_path):
    """A re-formed learner goes on from its checkpoint in the same process: the same rewind as a resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunLog(tmp_path, trackers=[TensorBoard(tmp_path, None)])
    for step in range(1, 5):
        run.log("stage1", step, {"loss": float(step)})
    run.rewind(2)  # the learner died after step 4; its checkpoint is step 2's
    for step in (3, 4, 5):
        run.log("stage1", step, {"loss": 10.0 * step})
    run.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [(r["step"], r["loss"]) for r in records] == expected
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("stage1/loss")] == expected
