"""`coordexp-rl ablate`: equal budgets per arm, the table and its verdicts, and one real two-arm run."""

from __future__ import annotations

import json
import math

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.tools import ablate, ablate_table


def _budget(name: str) -> int:
    cfg = load_config(ablate.arm_config(name))
    return cfg.stage1.steps + cfg.stage2.steps


def test_every_arm_has_the_default_step_budget():
    arms = ablate.all_arms()
    assert {"default", "stage2_sft", "ce_only", "no_coord_ce_stage2", "topk_expectation", "coord_soft_ce",
            "coord_w1"} <= set(arms)
    same = [a for a in arms if a not in ablate_table.BUDGET_ARMS]
    assert {a: _budget(a) for a in same} == {a: _budget("default") for a in same}
    assert all(_budget(a) != _budget("default") for a in ablate_table.BUDGET_ARMS)
    for q in ablate_table.QUESTIONS:
        assert q.baseline in arms and q.variant in arms, q


def test_scale_shrinks_every_arm_alike(tmp_path):
    def steps(arm):
        o = dict(x.split("=", 1) for x in ablate.arm_overrides(arm, 3, 0.1, tmp_path, []))
        return int(o["stage1.steps"]) + int(o["stage2.steps"]), o

    total, o = steps("default")
    assert o["run.seed"] == o["model.tiny_seed"] == "3" and o["run.out_dir"] == str(tmp_path)
    assert total == pytest.approx(0.1 * _budget("default"), abs=1)
    assert steps("stage2_sft")[0] == pytest.approx(total, abs=1)
    # a pretrained tiny model is one model for every seed (as a real VLM): the seed leaves it alone
    pretrained = dict(x.split("=", 1) for x in ablate.arm_overrides("default", 3, 1, tmp_path,
                                                                    ["model.tiny_pretrain_steps=50"]))
    assert pretrained["run.seed"] == pretrained["rollout.seed"] == "3" and "model.tiny_seed" not in pretrained


def test_verdict_separates_noise_from_a_real_difference():
    assert "within noise" in ablate_table.verdict((0.50, 0.04, 3), (0.52, 0.03, 3))
    assert "beyond noise" in ablate_table.verdict((0.50, 0.01, 3), (0.60, 0.02, 3))
    assert "one seed" in ablate_table.verdict((0.5, math.nan, 1), (0.6, math.nan, 1))
    assert ablate_table.verdict(None, (0.6, 0.1, 2)) == "missing runs"
    assert ablate_table.summarise([0.2, None, 0.4]) == pytest.approx((0.3, math.sqrt(0.02), 2))


def test_write_results_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- ablation table: begin -->\nold\n"
                    "<!-- ablation table: end -->\n\noutro\n")
    ablate_table.write_results(path, "new table\n")
    text = path.read_text()
    assert "old" not in text and "new table" in text and text.startswith("# Results\n\nintro") and "outro" in text


def test_step_overrides_are_refused(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    assert ablate.run(parser.parse_args(["stage1.steps=5"])) == 2
    assert "--scale" in capsys.readouterr().err


@pytest.mark.integration
def test_two_arms_really_run_and_fill_the_table(tmp_path):
    """Two arms, one seed, a few steps each, through the real launcher (Ray, the transformers engine: the tool
    does not depend on the engine, and it starts in a third of vLLM's time); a rerun reads back."""
    import argparse

    small = ["data.synth_train=32", "data.synth_val=8", "eval.max_samples=8", "rollout.max_new_tokens=48",
             "optim.batch_size=4", "stage2.sync_every=2", "rollout.engine=hf"]
    default = load_config(None)
    scale = 1 / default.stage2.steps  # 1 Stage-2 step per arm, after round(stage1.steps / stage2.steps) Stage-1 steps
    out = tmp_path / "RESULTS.md"
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    args = parser.parse_args(["--arms", "default", "stage2_sft", "--seeds", "0", "--scale", str(scale), "--jobs", "2",
                              "--runs-dir", str(tmp_path / "runs"), "--out", str(out), *small])
    assert ablate.run(args) == 0, (tmp_path / "runs" / "default" / "seed0" / "launch.log").read_text()[-3000:]
    table = out.read_text()
    assert "| default | 1/1 |" in table and "| stage2_sft | 1/1 |" in table
    results = json.loads((tmp_path / "runs" / "default" / "seed0" / "results.json").read_text())
    assert list(results) == ["initial", "stage1", "stage2"]
    # the control arm started from the default's Stage-1 and synced its SFT steps before the last evaluation
    sft = [json.loads(line) for line in (tmp_path / "runs" / "stage2_sft" / "seed0" / "metrics.jsonl").open()]
    last_step = max(i for i, r in enumerate(sft) if r["stage"] == "stage2")
    steps = round(default.stage1.steps * scale) + round(default.stage2.steps * scale)
    assert sft[last_step]["step"] == steps and any(r["stage"] == "sync" for r in sft[last_step:])
    # A second call finds results.json and does not rerun (it would take minutes).
    stamp = (tmp_path / "runs" / "default" / "seed0" / "launch.log").stat().st_mtime
    assert ablate.run(args) == 0
    assert (tmp_path / "runs" / "default" / "seed0" / "launch.log").stat().st_mtime == stamp


def test_a_finished_run_is_reused_only_with_the_same_config(tmp_path, capsys):
    """results.json is read back when the saved config matches this call; another --scale is refused."""
    import argparse

    from coordexp_rl.config import dump_config

    out = tmp_path / "runs" / "default" / "seed0"
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(dump_config(load_config(None, ablate.arm_overrides("default", 0, 0.5, out, []))))
    (out / "results.json").write_text(json.dumps({"stage2": {"object_prob/AP50": 0.25, "mean_iou": 0.5}}))
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    common = ["--arms", "default", "--seeds", "0", "--runs-dir", str(tmp_path / "runs"),
              "--out", str(tmp_path / "R.md")]
    assert ablate.run(parser.parse_args([*common, "--scale", "0.5"])) == 0  # read back, nothing launched
    assert "| default | 1/1 | 0.2500 |" in (tmp_path / "R.md").read_text()
    assert ablate.run(parser.parse_args([*common, "--scale", "0.25"])) == 2
    err = capsys.readouterr().err
    assert "stage1.steps" in err and "--runs-dir" in err
    # a run saved with Stage-2's rate spelled out (older configs) is the same run when the rate is equal
    saved = ablate.arm_overrides("default", 0, 0.5, out, [])
    (out / "config.yaml").write_text(dump_config(load_config(None, [*saved, "stage2.lr=0.0001"])))
    assert ablate.run(parser.parse_args([*common, "--scale", "0.5"])) == 0
    (out / "config.yaml").write_text(dump_config(load_config(None, [*saved, "stage2.lr=0.0002"])))
    assert ablate.run(parser.parse_args([*common, "--scale", "0.5"])) == 2
    assert "stage2.lr" in capsys.readouterr().err


def test_only_stage2_arms_share_the_default_stage1(tmp_path):
    """stage2_sft starts from the default's Stage-1 checkpoint of its seed; arms that change Stage-1 do not."""
    assert ablate.shares_stage1("stage2_sft", []) and not ablate.shares_stage1("ce_only", [])
    assert not ablate.shares_stage1("default", [])
    # matching.* and the Stage-2 loss weights are Stage-2-only too; the Stage-1 losses, coordexp and order are not
    for arm in ("gate_held", "no_coord_ce_stage2", "stage2_lr_high", ablate.EQUAL_COMPUTE_ARM):
        assert ablate.shares_stage1(arm, []), (arm, ablate.changed_keys(arm, []))
    for arm in ("ce_only", "coord_w1", "coord_soft_ce", "topk_expectation"):
        assert not ablate.shares_stage1(arm, []), arm
    runs = tmp_path / "runs"
    o = dict(x.split("=", 1) for x in ablate.arm_overrides("stage2_sft", 1, 1.0, runs / "stage2_sft" / "seed1", []))
    stage1 = load_config(None).stage1.steps
    assert o["run.resume"] == str(runs / "default" / "seed1" / "checkpoints" / f"step-{stage1:06d}")
    d = dict(x.split("=", 1) for x in ablate.arm_overrides("default", 1, 1.0, runs / "default" / "seed1", []))
    assert d["run.checkpoint_every"] == str(stage1) and "run.resume" not in d  # keeps the checkpoint others start from


def test_default_runs_are_marked_running_before_any_job_starts(tmp_path, monkeypatch):
    """With --jobs 2 a Stage-2-only arm can reach its wait before the default's job begins; it must still
    see the default of its seed as running (else it finds no Stage-1 checkpoint and is skipped)."""
    import argparse

    seen = {}

    def fake_run_arm(name, seed, scale, runs_dir, extra, base=None):
        if name == "stage2_sft":
            seen["marked"] = (runs_dir / "default" / f"seed{seed}" / "running").exists()
        return None

    monkeypatch.setattr(ablate, "run_arm", fake_run_arm)
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    args = parser.parse_args(["--arms", "default", "stage2_sft", "--seeds", "0", "--jobs", "2",
                              "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "R.md")])
    assert ablate.run(args) == 1  # the fake runs produced nothing
    assert seen["marked"] and not (tmp_path / "runs" / "default" / "seed0" / "running").exists()


def test_an_arm_changing_a_key_stage1_reads_runs_stage1_again(tmp_path, monkeypatch):
    """One Stage-1 key among Stage-2-only ones is enough to rerun Stage-1: loss.eos_weight weighs the end of
    turn of Stage-1's GT sequences as well as Stage-2's."""
    monkeypatch.setattr(ablate, "ABLATIONS", tmp_path)
    (tmp_path / "s2.yaml").write_text("loss:\n  lambda_geo: 1.0\n  extra_eos_weight: 3.0\n"
                                      "matching:\n  iou_thr_end: 0.4\neval:\n  max_samples: 8\n"
                                      "run:\n  out_dir: runs/x\n")
    (tmp_path / "s1.yaml").write_text("loss:\n  lambda_geo: 1.0\n  eos_weight: 2.0\n")
    assert ablate.shares_stage1("s2", []) and not ablate.shares_stage1("s1", [])
    assert ablate.changed_keys("s1", []) == ["loss.eos_weight", "loss.lambda_geo"]


# Stage-2-only keys the learner reads when it is built, into objects only Stage-2 uses (the value check of
# test_stage2_only_keys_leave_stage1_unchanged covers them): a new one must be added here with its reason.
INIT_READS = {"matching": "Learner.curriculum and SequenceBuilder.match_settings (Stage-2 matching)",
              "loss.extra_eos_weight": "SequenceBuilder.match_settings (Stage-2 targets)",
              "stage2.gt_order": "SequenceBuilder.match_settings (Stage-2 targets)",
              "stage2.lr": "the lr schedule's factor from step stage1.steps on (learner.lr_schedule)",
              "stage2.lr_ratio": "the same factor, when stage2.lr is unset (config.stage2_lr)"}


def _perturbed(section: str, name: str, value):
    """A valid value other than ``value`` for the field ``section.name`` (its type decides)."""
    import typing

    from coordexp_rl.config import Config

    annotation = Config.model_fields[section].annotation.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return next(a for a in typing.get_args(annotation) if a != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value * 0.5 + 0.125  # stays inside [0, 1] for fractions (top_p, thresholds)
    if value is None:
        return 0.5
    if isinstance(value, list):  # run.loggers: another valid list
        more = [a for a in typing.get_args(typing.get_args(annotation)[0]) if a not in value]
        return [*value, *more[:1]]
    return f"{value}_changed"


def test_stage2_only_keys_leave_stage1_unchanged(tiny_model_dir, synth_dir, monkeypatch):
    """Every key of config.STAGE2_ONLY_KEYS, checked on the learner's Stage-1 path (``LearnerWorker``: its
    data checks and stream, sequences, losses, optimizer and schedule): (1) every config attribute read is
    recorded: no Stage-1 step reads any of them, and building the learner reads only those that go into
    Stage-2's own objects (INIT_READS); (2) with ALL of them changed at once (the learner built from that
    config, its steps in chunks of 1 instead of 2, like another run.log_every) the losses and the weights
    after the last Stage-1 step are bit-identical. A positive control shows the test bites: changing
    loss.eos_weight (read by Stage-1) is seen by both checks. The driver's own reads (eval.*, run.out_dir,
    run.log_every: evaluations, the run folder, chunking) never reach the learner."""
    import torch

    from coordexp_rl.config import STAGE2_ONLY_KEYS, Config, is_stage2_only, load_config
    from learner.ray_learner import LearnerWorker

    sections = Config.model_fields
    for key in STAGE2_ONLY_KEYS:  # no typo: each entry is a section or a field of one
        section, _, name = key.partition(".")
        assert section in sections and (not name or name in sections[section].annotation.model_fields), key

    reads: set[str] = set()
    for section, field in sections.items():
        cls = field.annotation

        def recording(self, attr, _section=section, _fields=cls.model_fields):
            if attr in _fields:
                reads.add(f"{_section}.{attr}")
            return object.__getattribute__(self, attr)

        monkeypatch.setattr(cls, "__getattribute__", recording)

    base = load_config(None, ["optim.batch_size=2", "optim.warmup_steps=1", "stage1.steps=2"])
    changed = base.model_dump()
    for section, keys in changed.items():
        for name, value in keys.items():
            if is_stage2_only(f"{section}.{name}"):
                keys[name] = _perturbed(section, name, value)
    control = base.model_copy(update={"loss": base.loss.model_copy(update={"eos_weight": 3.0})}).model_dump()

    def stage1(cfg: dict, chunks: list[int]):
        reads.clear()
        worker = LearnerWorker(cfg, str(tiny_model_dir), str(synth_dir / "train.jsonl"))
        at_init = set(reads)
        reads.clear()
        losses = [m["loss/total"] for n in chunks for m in worker.stage1_steps(n)]
        return losses, at_init, set(reads), worker.learner.model.state_dict()

    losses, at_init, read, weights = stage1(base.model_dump(), [2])
    assert not sorted(k for k in read if is_stage2_only(k))
    assert "loss.eos_weight" in read and "optim.lr" not in read  # the lr is read once, into the schedule
    assert sorted(k for k in at_init if is_stage2_only(k) and k not in INIT_READS and k.split(".")[0] not in
                  INIT_READS) == []
    losses_changed, _, _, weights_changed = stage1(changed, [1, 1])
    assert losses_changed == losses
    assert all(torch.equal(weights[k], weights_changed[k]) for k in weights)
    losses_control, _, _, _ = stage1(control, [2])
    assert losses_control != losses


def _write_records(run, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_stage_costs_and_the_equal_compute_budget(tmp_path):
    """Hand-worked: Stage-1 steps of 100 and 140 learner tokens are 3 x 120 = 360 units per SFT step; two EM
    steps of 200 learner + 150 rollout tokens are 2 x (600 + 150) = 1500 units: 1500 / 360 = 4.17 -> 4 SFT
    steps. Stage-2's wall time runs from the record before its first step (the Stage-1 evaluation) to its
    last step."""
    _write_records(tmp_path, [
        {"stage": "data", "step": 0, "time": 0.0},
        {"stage": "stage1", "step": 1, "time": 1.0, "compute/learner_tokens": 100.0},
        {"stage": "stage1", "step": 2, "time": 2.0, "compute/learner_tokens": 140.0},
        {"stage": "eval", "step": 2, "time": 10.0, "label": "stage1"},
        {"stage": "stage2", "step": 3, "time": 12.5, "compute/learner_tokens": 200.0, "compute/rollout_tokens": 150.0},
        {"stage": "sync", "step": 3, "time": 13.0, "version": 2},
        {"stage": "stage2", "step": 4, "time": 16.0, "compute/learner_tokens": 200.0, "compute/rollout_tokens": 150.0},
        {"stage": "eval", "step": 4, "time": 30.0, "label": "stage2"}])
    costs = ablate.stage_costs(tmp_path)
    assert costs == {"stage1_step_units": 360.0, "Stage-2 compute (units)": 1500.0, "Stage-2 wall s": 6.0}
    assert ablate.equal_compute_steps(tmp_path) == 4
    assert ablate.equal_compute_steps(tmp_path / "missing") is None
    _write_records(tmp_path / "old", [{"stage": "stage1", "step": 1, "time": 1.0}])  # a run without the counters
    assert ablate.equal_compute_steps(tmp_path / "old") is None


def test_arms_on_a_base_config_and_the_equal_compute_arm(tmp_path, monkeypatch):
    """``--config configs/dense_cpu.yaml``: every launch gets the base, then the arm's YAML; the default arm is
    the base alone; the equal-compute arm starts from the default's Stage-1 checkpoint with stage2.steps from
    the default's logged compute; the table names the base and goes into the base's own block. The launcher
    is faked: it writes the records and results a run would (100 learner tokens per SFT step: 300 units; per
    EM step 200 learner + 160 rollout tokens: 3 x 200 + 160 = 760 units)."""
    import argparse
    from pathlib import Path

    calls = []

    def fake_launch(cmd, stdout, stderr, cwd):
        calls.append(cmd)
        files = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--config"]
        cfg = load_config(files, [c for c in cmd[3:] if "=" in c and not c.startswith("-")])
        out, s1, s2 = Path(cfg.run.out_dir), cfg.stage1.steps, cfg.stage2.steps
        records = [] if cfg.run.resume else [
            {"stage": "stage1", "step": i, "time": float(i), "compute/learner_tokens": 100.0} for i in range(1, s1 + 1)]
        records.append({"stage": "eval", "step": s1, "time": 100.0, "label": "stage1"})
        em = {"compute/learner_tokens": 200.0, "compute/rollout_tokens": 160.0}
        sft = {"compute/learner_tokens": 100.0}
        records += [{"stage": "stage2", "step": s1 + k, "time": 100.0 + k, **(em if cfg.stage2.method == "em" else sft)}
                    for k in range(1, s2 + 1)]
        _write_records(out, records)
        (out / "checkpoints" / f"step-{s1:06d}").mkdir(parents=True)
        (out / "checkpoints" / f"step-{s1:06d}" / "COMPLETE").touch()
        (out / "results.json").write_text(json.dumps({"stage2": {"object_prob/AP50": 0.5}}))
        return 0

    monkeypatch.setattr(ablate.subprocess, "call", fake_launch)
    base = ablate.REPO / "configs" / "dense_cpu.yaml"
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    out = tmp_path / "R.md"
    args = parser.parse_args(["--config", str(base), "--arms", "default", ablate.EQUAL_COMPUTE_ARM, "ce_only",
                              "--seeds", "0", "--scale", "0.01", "--runs-dir", str(tmp_path / "runs"),
                              "--out", str(out)])
    assert ablate.run(args) == 0
    by_arm = {Path(next(x for x in c if x.startswith("run.out_dir="))).parent.name: c for c in calls}
    assert set(by_arm) == {"default", ablate.EQUAL_COMPUTE_ARM, "ce_only"}
    assert [by_arm["default"][i + 1] for i, c in enumerate(by_arm["default"]) if c == "--config"] == [str(base)]
    compute = by_arm[ablate.EQUAL_COMPUTE_ARM]
    assert [compute[i + 1] for i, c in enumerate(compute) if c == "--config"] == [
        str(base), str(ablate.ABLATIONS / f"{ablate.EQUAL_COMPUTE_ARM}.yaml")]
    # dense Stage-2: 300 x 0.01 = 3 EM steps = 2280 units; one SFT step 300 units: 7.6 -> 8 SFT steps
    assert "stage2.steps=8" in compute and any(x.startswith("run.resume=") for x in compute)
    assert not any(x.startswith("run.resume=") for x in by_arm["ce_only"])
    table = out.read_text()
    assert "<!-- ablation table (configs/dense_cpu.yaml): begin -->" in table
    assert "Base config: `configs/dense_cpu.yaml`" in table and "--config configs/dense_cpu.yaml" in table
    assert "| Stage-2 compute (units) | Stage-2 wall s |" in table
    rows = {}  # the first row of each arm: the summary table (the per-seed table follows)
    for line in table.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert "| 2280 | 3.0 |" in rows["default"] and "| 2400 | 8.0 |" in rows[ablate.EQUAL_COMPUTE_ARM]
    assert "Stage-2 EM vs extra SFT at equal compute" in table


def test_table_pairs_recall_at_six_plus_and_duplicates_and_lists_every_seed():
    def res(ap, rec, dup):
        return {"stage2": {"object_prob/AP50": ap, "breakdown/recall@6+": rec, "breakdown/duplicates_per_image": dup}}

    per_arm = {"stage2_sft": [res(0.30, 0.40, 0.5), res(0.20, 0.30, 0.7)],
               "default": [res(0.35, 0.50, 0.25), None]}
    table = ablate_table.render({a: [ablate_table.final_metrics(r) if r else None for r in rs]
                                 for a, rs in per_arm.items()}, [3, 4], 1.0, "cmd")
    em_vs_sft = next(line for line in table.splitlines() if line.startswith("| Stage-2 EM vs the same number"))
    # seed 3 only (seed 4's EM run failed): recall +0.10, duplicates -0.25, each from one seed
    assert "+0.1000 (one seed)" in em_vs_sft and "-0.2500 (one seed)" in em_vs_sft
    assert "| default | 3 | 0.3500 | 0.5000 | 0.2500 | n/a |" in table
    assert "| default | 4 | failed | failed | failed | failed |" in table
    assert "| stage2_sft | 4 | 0.2000 | 0.3000 | 0.7000 | n/a |" in table


def test_stage1_curve_area_and_the_step_that_leaves_the_average_box(tmp_path):
    rows = [("eval", 0, "initial", 0.0, 0.0), ("stage1", 100, None, None, None),
            ("eval", 100, "step-000100", 0.2, 0.1), ("eval", 200, "step-000200", 0.4, 0.3),
            ("eval", 300, "stage1", 0.4, 0.5), ("eval", 350, "step-000350", 0.9, 0.9),
            ("eval", 400, "stage2", 0.9, 0.9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"stage": st, "step": s, "label": lab, "eval/object_prob/AP50": ap, "eval/f1_class_agnostic": f1}) + "\n"
        for st, s, lab, ap, f1 in rows))
    # trapezoids over 0..300 (Stage-2's points are past Stage-1): (100 x 0.1 + 100 x 0.3 + 100 x 0.4) / 300
    # = 0.2667; class-agnostic F1 first >= 0.2 at step 200
    stats = ablate.curve_stats(tmp_path)
    assert stats[ablate_table.CURVE[0]] == pytest.approx(80 / 300) and stats[ablate_table.CURVE[1]] == 200
    # an arm that started from the default's Stage-1 checkpoint has no curve
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"stage": "eval", "step": s, "label": lab,
                                                                 "eval/object_prob/AP50": 0.3}) + "\n"
                                                    for s, lab in ((300, "stage1"), (400, "stage2"))))
    assert ablate.curve_stats(tmp_path) == {c: None for c in ablate_table.CURVE}


def test_scale_keeps_the_curve_points_and_turns_them_off_below_one_interval(tmp_path):
    def every(scale):
        over = ablate.arm_overrides("default", 0, scale, tmp_path, ["stage1.steps=1000", "eval.every=100"])
        return [o for o in over if o.startswith("eval.every=")][-1]  # the launcher takes the last

    assert every(0.5) == "eval.every=50" and every(0.001) == "eval.every=0"  # stage1.steps 1: no room for one
