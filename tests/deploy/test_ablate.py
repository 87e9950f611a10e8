"""`coordexp-rl ablate`: equal budgets per arm, the table and its verdicts, and one real two-arm run."""

from __future__ import annotations

import json
import math

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.tools import ablate


def _budget(name: str) -> int:
    cfg = load_config(ablate.arm_config(name))
    return cfg.stage1.steps + cfg.stage2.steps


def test_every_arm_has_the_default_step_budget():
    arms = ablate.all_arms()
    assert {"default", "stage2_sft", "ce_only", "no_coord_ce_stage2", "topk_expectation", "coord_soft_ce",
            "coord_w1"} <= set(arms)
    assert {a: _budget(a) for a in arms} == {a: _budget("default") for a in arms}
    for q in ablate.QUESTIONS:
        assert q.baseline in arms and q.variant in arms, q


def test_scale_shrinks_every_arm_alike(tmp_path):
    def steps(arm):
        o = dict(x.split("=", 1) for x in ablate.arm_overrides(arm, 3, 0.1, tmp_path, []))
        return int(o["stage1.steps"]) + int(o["stage2.steps"]), o

    total, o = steps("default")
    assert o["run.seed"] == o["model.tiny_seed"] == "3" and o["run.out_dir"] == str(tmp_path)
    assert total == pytest.approx(0.1 * _budget("default"), abs=1)
    assert steps("stage2_sft")[0] == pytest.approx(total, abs=1)


def test_verdict_separates_noise_from_a_real_difference():
    assert "within noise" in ablate.verdict((0.50, 0.04, 3), (0.52, 0.03, 3))
    assert "beyond noise" in ablate.verdict((0.50, 0.01, 3), (0.60, 0.02, 3))
    assert "one seed" in ablate.verdict((0.5, math.nan, 1), (0.6, math.nan, 1))
    assert ablate.verdict(None, (0.6, 0.1, 2)) == "missing runs"
    assert ablate.summarise([0.2, None, 0.4]) == pytest.approx((0.3, math.sqrt(0.02), 2))


def test_write_results_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n\n<!-- ablation table: begin -->\nold\n"
                    "<!-- ablation table: end -->\n\noutro\n")
    ablate.write_results(path, "new table\n")
    text = path.read_text()
    assert "old" not in text and "new table" in text and text.startswith("# Results\n\nintro") and "outro" in text


def test_step_overrides_are_refused(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    assert ablate.run(parser.parse_args(["stage1.steps=5"])) == 2
    assert "--scale" in capsys.readouterr().err


def test_two_arms_really_run_and_fill_the_table(tmp_path):
    """Two arms, one seed, a few steps each, through the real launcher (Ray + vLLM); a rerun reads back."""
    import argparse

    small = ["data.synth_train=32", "data.synth_val=8", "eval.max_samples=8", "rollout.max_new_tokens=48",
             "optim.batch_size=4", "stage2.sync_every=2"]
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


def test_only_stage2_arms_share_the_default_stage1(tmp_path):
    """stage2_sft starts from the default's Stage-1 checkpoint of its seed; arms that change Stage-1 do not."""
    assert ablate.shares_stage1("stage2_sft", []) and not ablate.shares_stage1("ce_only", [])
    assert not ablate.shares_stage1("default", [])
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

    def fake_run_arm(name, seed, scale, runs_dir, extra):
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
