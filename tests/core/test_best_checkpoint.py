"""eval.best_metric (coordexp_rl/driver/run_control.py BestCheckpoint): the best curve point's checkpoint is
kept beyond run.keep_last and named in best.json; a point's checkpoint is protected until its score is in."""

from __future__ import annotations

import json

import pytest

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.driver.run_control import BestCheckpoint


class Checkpoints:  # the run's Checkpoints, without a learner: ensure() names the folder it would save
    def __init__(self, folder):
        self.folder, self.protected, self.saved = folder, set(), []

    def ensure(self, step, driver_state):
        self.saved.append(step)
        return str(self.folder / f"step-{step:06d}")


def test_the_best_point_stays_protected_and_the_others_are_released(tmp_path):
    ckpt = Checkpoints(tmp_path)
    best = BestCheckpoint(ckpt, "object_prob/AP50")
    for step in (100, 200):
        best.saving_for(step, {})
    assert ckpt.protected == {str(tmp_path / "step-000100"), str(tmp_path / "step-000200")}  # both pending
    best.scored("step-000200", 200, {"object_prob/AP50": 0.3})
    best.scored("step-000100", 100, {"object_prob/AP50": 0.2})  # scored later, worse: released
    assert ckpt.protected == {str(tmp_path / "step-000200")}
    best.saving_for(300, {})
    best.scored("step-000300", 300, {"object_prob/AP50": 0.5})  # better: the old best is released
    assert ckpt.protected == {str(tmp_path / "step-000300")}
    saved = json.loads((tmp_path / "best.json").read_text())
    assert (saved["step"], saved["value"], saved["label"]) == (300, 0.5, "step-000300")
    best.scored("stage2", 400, {"object_prob/AP50": 0.9})  # another evaluation (other images): not a candidate
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 300
    # a resumed run keeps its best (and its protection)
    assert BestCheckpoint(Checkpoints(tmp_path), "object_prob/AP50").checkpoints.protected == {saved["path"]}


def test_an_unknown_metric_is_named_at_the_first_score_and_best_needs_curve_points(tmp_path):
    best = BestCheckpoint(Checkpoints(tmp_path), "AP50")
    with pytest.raises(ValueError, match=r"eval.best_metric='AP50' is not an evaluation metric; use one of"):
        best.scored("initial", 0, {"object_prob/AP50": 0.1, "mean_iou": 0.4})
    with pytest.raises(ConfigError, match="eval.best_metric=object_prob/AP50 picks among the curve points"):
        load_config(None, ["eval.best_metric=object_prob/AP50"])
