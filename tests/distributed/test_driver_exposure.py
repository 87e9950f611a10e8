"""``Driver.score``: after Stage-1 and Stage-2 (never for "initial", which runs beside Stage-1 training) the
learner's teacher-forced IoUs join the headline as ``exposure/...`` and ``eval/<label>/exposure.json``.
No Ray: the actors' evaluation and the learner are stand-ins (the real ones: tests/learner/test_exposure.py
and the launcher tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.driver import driver as driver_module


class FakeLearner:
    """``learner.teacher_forced_ious.remote(val_path, image_root, n)``, resolved by the patched ``ray.get``."""

    def __init__(self):
        self.calls = []
        self.teacher_forced_ious = SimpleNamespace(remote=self._remote)

    def _remote(self, val_path, image_root, n):
        self.calls.append((val_path, image_root, n))
        return [[0.5] * len(s.objects) for s in load_samples(val_path, image_root)[:n]]


@pytest.fixture
def driver(tmp_path, synth_dir, monkeypatch):
    def make(*overrides):
        d = driver_module.Driver(load_config(None, [f"run.out_dir={tmp_path}", "eval.max_samples=4", *overrides]))
        d.assets = SimpleNamespace(val_path=synth_dir / "val.jsonl", val_image_root=None)
        d.val_samples = load_samples(synth_dir / "val.jsonl")
        d.rollout, d.syncer = SimpleNamespace(actors=[]), SimpleNamespace(keep_weights_for_restarts=lambda: None)
        d.learner, d.step, d.last_sync_step = FakeLearner(), 10, 10
        return d

    def evaluate_on_actors(actors, samples, gt_path, image_root, folder, on_gone):
        """Predictions = the GT boxes, except none for the first image."""
        gts = [json.loads(line) for line in gt_path.read_text().splitlines()][: len(samples)]
        preds = [{**g, "objects": [] if i == 0 else g["objects"], "parse_status": "ok"} for i, g in enumerate(gts)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        return {"mean_iou_class_agnostic": 1.0}

    monkeypatch.setattr(driver_module, "evaluate_on_actors", evaluate_on_actors)
    monkeypatch.setattr(driver_module, "ray", SimpleNamespace(get=lambda ref: ref))
    return make


def test_exposure_keys_after_stage1_and_stage2_only(driver, synth_dir, tmp_path):
    d = driver()
    assert d.score("initial") == {"mean_iou_class_agnostic": 1.0} and d.learner.calls == []
    assert not (tmp_path / "eval" / "initial" / "exposure.json").exists()
    boxes = [len(s.objects) for s in d.val_samples[:4]]
    recall = (sum(boxes) - boxes[0]) / sum(boxes)  # the first image's boxes were missed, the others written exactly
    for label in ("stage1", "stage2"):
        headline = d.score(label)
        assert headline == pytest.approx({
            "mean_iou_class_agnostic": 1.0, "exposure/teacher_forced_mean_iou": 0.5,
            "exposure/free_running_mean_iou": 1.0, "exposure/free_running_recall_iou": recall,
            "exposure/gap": 0.5 - recall})
        saved = json.loads((tmp_path / "eval" / label / "exposure.json").read_text())
        assert saved["exposure/gap"] == pytest.approx(0.5 - recall) and saved["learner_steps_ahead"] == 0
        assert [p["gt_boxes"] for p in saved["per_image"]] == boxes
        assert saved["per_image"][0]["free_running_recall_iou"] == [0.0] * boxes[0]
    assert d.learner.calls == [(str(synth_dir / "val.jsonl"), None, 4)] * 2


def test_switched_off(driver):
    d = driver("eval.exposure=false")
    assert d.score("stage1") == {"mean_iou_class_agnostic": 1.0} and d.learner.calls == []
