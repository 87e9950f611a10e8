"""The run's evaluations (coordexp_rl.driver.evaluations.Evaluations): the initial one runs beside
Stage-1, is logged at step 0 as soon as it is scored, waited for before the first sync, its error raised in
the driver, skipped on a resume past step 0; those kept from before a resume are not redone. The scoring
itself (actors, metrics) is the launcher integration tests'; here it is a stand-in."""

from __future__ import annotations

import json
import threading
from contextlib import closing

import pytest

from coordexp_rl.driver.evaluations import Evaluations
from coordexp_rl.driver.run_log import RunLog


@pytest.fixture
def run_log(tmp_path):
    log = RunLog(tmp_path)
    yield log
    log.close()


def rows(tmp_path) -> list[tuple]:
    return [(r["stage"], r["step"], r.get("label")) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]


def test_scored_beside_training_and_logged_at_step_0(run_log, tmp_path):
    release = threading.Event()
    evals = Evaluations(lambda label, n: release.wait(10) and {"mean_iou": 0.25}, run_log)  # scoring while Stage-1 logs
    evals.start("initial", 0)
    run_log.log("stage1", 1, {"loss/total": 1.0})
    assert "initial" not in evals.results and evals.pending[0].is_alive()
    release.set()
    evals.wait()
    assert evals.results == {"initial": {"mean_iou": 0.25}}
    assert rows(tmp_path) == [("stage1", 1, None), ("eval", 0, "initial")]
    evals.once("stage1", 7)
    assert rows(tmp_path)[-1] == ("eval", 7, "stage1") and json.loads(
        (tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["eval/mean_iou"] == 0.25


def test_its_error_is_raised_in_the_driver(run_log):
    def fail(label, n):
        raise RuntimeError("actors gone")

    evals = Evaluations(fail, run_log)
    evals.start("initial", 0)
    with pytest.raises(RuntimeError, match="actors gone"):
        evals.wait()
    evals.wait()  # raised once; nothing pending after


def test_skipped_when_resumed_past_step_0_or_kept(tmp_path, caplog):
    never = lambda label, n: pytest.fail("the actors hold a checkpoint's weights, not the initial ones")  # noqa: E731
    with closing(RunLog(tmp_path)) as first:
        first.log("eval", 0, {"label": "initial", "eval/mean_iou": 0.1})
        first.log("stage1", 4, {"loss/total": 1.0})
    with closing(RunLog(tmp_path, resume_step=4)) as resumed:
        evals = Evaluations(never, resumed)
        assert evals.results == {"initial": {"mean_iou": 0.1}}
        with caplog.at_level("INFO", logger="coordexp_rl.driver.evaluations"):
            evals.start("initial", 4)
            evals.wait()
            evals.once("initial", 4)
        assert "kept from before the resume" in caplog.text
    with closing(RunLog(tmp_path / "other", resume_step=5)) as fresh:
        evals = Evaluations(never, fresh)
        with caplog.at_level("INFO", logger="coordexp_rl.driver.evaluations"):
            evals.start("initial", 5)
        assert evals.pending is None and "skipped (resumed at step 5" in caplog.text
    assert rows(tmp_path)[-1] == ("stage1", 4, None)


def test_an_extended_run_evaluates_its_new_end_again(tmp_path, caplog):
    """A finished run resumed with more Stage-2 steps: its kept "stage2" evaluation was of the old end;
    the new end is scored and replaces it (report.md and results.json then show the new model)."""
    with closing(RunLog(tmp_path)) as first:
        first.log("eval", 0, {"label": "initial", "eval/mean_iou": 0.1})
        first.log("eval", 4, {"label": "stage1", "eval/mean_iou": 0.2})
        first.log("eval", 8, {"label": "stage2", "eval/mean_iou": 0.3})
    scored = []
    with closing(RunLog(tmp_path, resume_step=8)) as resumed:
        evals = Evaluations(lambda label, n: scored.append(label) or {"mean_iou": 0.5}, resumed)
        with caplog.at_level("INFO", logger="coordexp_rl.driver.evaluations"):
            evals.once("stage1", 4)  # the same end: kept
            evals.once("stage2", 12)
        assert scored == ["stage2"] and evals.results["stage2"] == {"mean_iou": 0.5}
        assert "made again at step 12 (the one kept from before the resume was at step 8)" in caplog.text
    assert rows(tmp_path)[-1] == ("eval", 12, "stage2")
