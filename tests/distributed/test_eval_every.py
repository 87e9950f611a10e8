"""eval.every: during Stage-1 the driver syncs the weights to the (idle) rollout actors every N learner steps
and scores them on eval.every_samples validation samples in a thread beside training (``step-N`` labels);
in Stage-2's EM loop it scores them synchronously.
No Ray here: the learner, the sync and the scoring are stand-ins; the real path runs in test_ray_job."""

from __future__ import annotations

import json
from contextlib import closing
from types import SimpleNamespace

import pytest

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.driver import driver as driver_module
from coordexp_rl.driver.evaluations import Evaluations
from coordexp_rl.driver.run_log import RunLog


def make_driver(tmp_path, monkeypatch, *overrides):
    d = driver_module.Driver(load_config(None, [f"run.out_dir={tmp_path}", *overrides]))
    events = []

    def stage1_steps(n):
        events.append(("train", d.step, n))
        return [{"step": d.step + i + 1, "loss/total": 1.0} for i in range(n)]

    d.learner = SimpleNamespace(stage1_steps=SimpleNamespace(remote=stage1_steps))
    d.rollout = SimpleNamespace(raise_start_failure=lambda: None)
    d.checkpoints = SimpleNamespace(save_if_due=lambda step, state: None)
    d.run_log = RunLog(tmp_path)
    d.evals = Evaluations(lambda label, n: events.append(("score", label, n)) or {"mean_iou": 0.5}, d.run_log)
    d.sync_weights = lambda: events.append(("sync", d.step))
    monkeypatch.setattr(driver_module, "ray", SimpleNamespace(get=lambda ref: ref))
    return d, events


def test_stage1_is_scored_every_n_steps_on_the_subset(tmp_path, monkeypatch):
    d, events = make_driver(tmp_path, monkeypatch, "stage1.steps=10", "eval.every=4", "eval.every_samples=3",
                            "run.log_every=3")
    with closing(d.run_log):
        d.stage1()
        d.evals.wait()
    # chunks of log_every 3 cut at the multiples of 4: 0+3, 3+1 | eval at 4 | 4+3, 7+1 | eval at 8 | 8+2 (the
    # end of Stage-1 has its own evaluation: none at 10)
    assert [e[1:] for e in events if e[0] == "train"] == [(0, 3), (3, 1), (4, 3), (7, 1), (8, 2)]
    assert [e for e in events if e[0] == "sync"] == [("sync", 4), ("sync", 8)]
    assert [e for e in events if e[0] == "score"] == [("score", "step-000004", 3), ("score", "step-000008", 3)]
    assert list(d.evals.results) == ["step-000004", "step-000008"]
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"eval"' in line]
    assert [(r["step"], r["label"], r["eval/mean_iou"]) for r in evals] == [(4, "step-000004", 0.5),
                                                                            (8, "step-000008", 0.5)]


def test_off_by_default_and_in_the_sft_control_stage_as_in_stage1(tmp_path, monkeypatch):
    d, events = make_driver(tmp_path, monkeypatch, "stage1.steps=10")
    with closing(d.run_log):
        d.stage1()
        assert not [e for e in events if e[0] != "train"]
        d.step = 10
        d.cfg.eval.every = 4
        d.stage1(14, label="stage2")  # stage2.method=sft spends Stage-2 on more SFT steps
        d.evals.wait()
    assert [e for e in events if e[0] == "score"] == [("score", "step-000012", 200)]


def test_the_em_loop_stops_for_its_curve_points_with_synced_weights(tmp_path, monkeypatch):
    """In Stage-2's EM loop the actors are generating: a point is scored synchronously, after a sync unless
    the step just synced (sync_every), and none at Stage-2's last step (its own evaluation follows)."""
    d, events = make_driver(tmp_path, monkeypatch, "stage1.steps=4", "stage2.steps=8", "stage2.sync_every=3",
                            "eval.every=2", "eval.every_samples=5")
    d.step = 4

    class Supervisor:
        down: dict = {}

        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            pass

        def learner_step(self, learner):
            events.append(("train", d.step, 1))
            return {"step": d.step + 1, "loss/total": 1.0, "match/mean_iou": 0.5}

        def drain(self):
            pass

        def stats(self):
            return {}

    def sync():
        events.append(("sync", d.step))
        d.last_sync_step = d.step

    monkeypatch.setattr(driver_module, "RolloutSupervisor", Supervisor)
    d.sync_weights, d.log_rollout_stats, d.rollout = sync, lambda: None, SimpleNamespace(actors=[], buffer=None)
    with closing(d.run_log):
        d.stage2()
    scored = [e[1] for e in events if e[0] == "score"]
    assert scored == ["step-000006", "step-000008", "step-000010"]  # 12 is the end of Stage-2
    syncs = [e[1] for e in events if e[0] == "sync"]
    assert syncs == [6, 7, 8, 10]  # every 3 Stage-2 steps (7, 10) and before the points at 6 and 8 only
    order = [e[:2] for e in events if e[0] in ("sync", "score")]
    assert order.index(("sync", 6)) < order.index(("score", "step-000006"))


def test_a_failed_evaluation_beside_training_stops_stage1_at_once(tmp_path, monkeypatch):
    """The initial evaluation scores in a thread while Stage-1 trains: its error (a broken validation file,
    actors that cannot start) ends the run within a step or two, not after the whole of Stage-1."""
    import time

    d, events = make_driver(tmp_path, monkeypatch, "stage1.steps=2000", "run.log_every=1")
    train = d.learner.stage1_steps.remote
    d.learner.stage1_steps.remote = lambda n: time.sleep(0.005) or train(n)

    def score(label, n):
        raise ValueError("validation file: line 3: bad box")

    d.evals = Evaluations(score, d.run_log)
    with closing(d.run_log):
        d.evals.start("initial", 0)
        with pytest.raises(ValueError, match="line 3: bad box"):
            d.stage1()
    assert len([e for e in events if e[0] == "train"]) < 100


def test_settings_that_cannot_work_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"eval.every=10 must be below stage1.steps \+ stage2.steps = 10"):
        load_config(None, ["stage1.steps=6", "stage2.steps=4", "eval.every=10"])
    load_config(None, ["stage1.steps=10", "stage2.steps=4", "eval.every=10"])  # a point in Stage-2
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, ["eval.every=-1"])
    with pytest.raises(ConfigError, match="eval.every_samples"):
        load_config(None, ["eval.every_samples=0"])
    load_config(None, ["stage1.steps=0", "eval.every=10"])  # a Stage-2-only run: nothing to evaluate in between


def test_a_subset_larger_than_the_validation_set_is_refused_before_ray_starts(tmp_path, tiny_model_dir, synth_dir):
    d = driver_module.Driver(load_config(None, [f"run.out_dir={tmp_path}", "eval.every=5", "eval.every_samples=9"]))
    d.assets = SimpleNamespace(model_path=tiny_model_dir, train_path=synth_dir / "train.jsonl", train_image_root=None,
                               val_path=synth_dir / "val.jsonl", val_image_root=None)
    with pytest.raises(ConfigError, match=rf"eval.every_samples=9: {synth_dir / 'val.jsonl'} holds only 8 validation"):
        d.check_data()
    d.cfg.eval.every_samples = 8
    d.check_data()
