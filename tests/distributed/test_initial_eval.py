"""The initial evaluation runs beside Stage-1 (launch.Driver.evaluate_meanwhile): logged at step 0 as soon
as it is scored, waited for before the first sync, its error raised in the driver, skipped on a resume
past step 0. The scoring itself (actors, metrics) is the integration tests'; here it is a stand-in."""

from __future__ import annotations

import json
import threading

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.launch import Driver
from coordexp_rl.run_log import RunLog


@pytest.fixture
def driver(tmp_path):
    d = Driver(load_config(None, [f"run.out_dir={tmp_path}"]))
    d.log = RunLog(tmp_path, tensorboard=False)
    yield d
    d.log.close()


def rows(tmp_path) -> list[tuple]:
    return [(r["stage"], r["step"], r.get("label")) for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]


def test_scored_beside_training_and_logged_at_step_0(driver, tmp_path):
    release = threading.Event()
    driver.score = lambda label: release.wait(10) and {"mean_iou": 0.25}  # still scoring while Stage-1 logs
    thread = driver.evaluate_meanwhile("initial")
    driver.log.log("stage1", 1, {"loss/total": 1.0})
    assert "initial" not in driver.results and thread.is_alive()
    release.set()
    driver.join_evaluation(thread)
    assert driver.results == {"initial": {"mean_iou": 0.25}}
    assert rows(tmp_path) == [("stage1", 1, None), ("eval", 0, "initial")]


def test_its_error_is_raised_in_the_driver(driver):
    def fail(label):
        raise RuntimeError("actors gone")

    driver.score = fail
    with pytest.raises(RuntimeError, match="actors gone"):
        driver.join_evaluation(driver.evaluate_meanwhile("initial"))


def test_skipped_when_resumed_past_step_0_or_kept(driver, tmp_path, caplog):
    driver.score = lambda label: pytest.fail("the actors hold a checkpoint's weights, not the initial ones")
    driver.step = 5
    with caplog.at_level("INFO", logger="coordexp_rl.launch"):
        assert driver.evaluate_meanwhile("initial") is None
    assert "skipped (resumed at step 5" in caplog.text
    driver.step, driver.results = 0, {"initial": {"mean_iou": 0.1}}
    assert driver.evaluate_meanwhile("initial") is None
    driver.join_evaluation(None)
    assert not (tmp_path / "metrics.jsonl").read_text()
