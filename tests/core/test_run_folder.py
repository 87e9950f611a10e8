"""A run folder belongs to one run (coordexp_rl/driver/run_folder.py): another launch into it is refused
unless it resumes or overwrites, and a resume is checked against the config its checkpoint was trained under."""

from __future__ import annotations

import json
import logging
import os

import pytest

from coordexp_rl.config import dump_config, load_config
from coordexp_rl.driver.run_folder import RunFolderError, claim_run_folder, probe_writable
from learner.checkpoint import FORMAT_VERSION, CheckpointError


def _earlier_run(out, *overrides):
    checkpoint = out / "checkpoints" / "step-000010"
    checkpoint.mkdir(parents=True)
    for name in ("model.safetensors", "optim.pt", "rng.pt", "COMPLETE"):  # what read_state checks without loading
        (checkpoint / name).write_text("")
    (checkpoint / "state.json").write_text(json.dumps({"format": FORMAT_VERSION, "step": 10}))
    (out / "metrics.jsonl").write_text('{"stage": "stage1", "step": 10}\n')
    (out / "config.yaml").write_text(dump_config(load_config(None, [f"run.out_dir={out}", *overrides])))
    (out / "launch.log").write_text("not a run output\n")


def test_a_fresh_or_empty_folder_is_claimed(tmp_path):
    claim_run_folder(load_config(None, [f"run.out_dir={tmp_path / 'new'}"]))
    claim_run_folder(load_config(None, [f"run.out_dir={tmp_path}"]))  # exists, holds no run


def test_a_folder_holding_another_run_is_refused_naming_the_ways_out(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(RunFolderError, match=r"holds another run \(config.yaml, metrics.jsonl, checkpoints\)") as e:
        claim_run_folder(load_config(None, [f"run.out_dir={tmp_path}"]))
    assert "run.resume=auto" in str(e.value) and "run.overwrite=true" in str(e.value)
    assert (tmp_path / "checkpoints" / "step-000010").is_dir()  # nothing touched


def test_overwrite_removes_the_earlier_run_outputs_only(tmp_path):
    _earlier_run(tmp_path)
    claim_run_folder(load_config(None, [f"run.out_dir={tmp_path}", "run.overwrite=true"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch.log"]


def test_resume_checks_the_config_the_checkpoint_was_trained_under(tmp_path, caplog):
    _earlier_run(tmp_path)
    out = f"run.out_dir={tmp_path}"
    # longer, observed differently, on other resources: resumed without a word
    claim_run_folder(load_config(None, [out, "run.resume=auto", "stage1.steps=9000", "eval.max_samples=64"]))
    with pytest.raises(RunFolderError, match=r"differs in what it trains: optim.lr: 0.001 -> 0.002"):
        claim_run_folder(load_config(None, [out, "run.resume=auto", "optim.lr=2e-3"]))
    with caplog.at_level(logging.WARNING):  # a Stage-2 setting: said, not refused
        claim_run_folder(load_config(None, [out, "run.resume=auto", "stage2.gt_order=canonical"]))
    assert "stage2.gt_order: 'reordered' -> 'canonical'" in caplog.text


def test_an_arm_resumes_another_runs_checkpoint_into_its_own_folder(tmp_path):
    """`coordexp-rl ablate`: a Stage-2-only arm starts from the default run's Stage-1 checkpoint."""
    default, arm = tmp_path / "default", tmp_path / "arm"
    default.mkdir()
    _earlier_run(default)
    checkpoint = default / "checkpoints" / "step-000010"
    claim_run_folder(load_config(None, [f"run.out_dir={arm}", f"run.resume={checkpoint}", "stage2.method=sft"]))
    with pytest.raises(RunFolderError, match="loss.lambda_l1"):  # Stage-1 trained otherwise: not its checkpoint
        claim_run_folder(load_config(None, [f"run.out_dir={arm}", f"run.resume={checkpoint}", "loss.lambda_l1=0"]))
    arm.mkdir()
    _earlier_run(arm)  # an interrupted earlier attempt of the arm: refused, unless overwritten
    with pytest.raises(RunFolderError, match="holds another run"):
        claim_run_folder(load_config(None, [f"run.out_dir={arm}", f"run.resume={checkpoint}"]))
    claim_run_folder(load_config(None, [f"run.out_dir={arm}", f"run.resume={checkpoint}", "run.overwrite=true"]))
    assert not (arm / "checkpoints").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "state.json").write_text("{garbage"), "state.json: damaged, cannot be read as JSON"),
    (lambda c: (c / "COMPLETE").unlink(), "incomplete checkpoint"),
    (lambda c: (c / "optim.pt").unlink(), "damaged checkpoint, optim.pt missing"),
    (lambda c: (c / "state.json").write_text('{"format": 1}'), "checkpoint format 1, this code reads 2"),
])
def test_a_damaged_checkpoint_to_resume_is_refused_before_the_work(tmp_path, damage, message):
    default = tmp_path / "default"
    default.mkdir()
    _earlier_run(default)
    checkpoint = default / "checkpoints" / "step-000010"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        claim_run_folder(load_config(None, [f"run.out_dir={tmp_path / 'arm'}", f"run.resume={checkpoint}"]))


def test_an_empty_out_dir_is_refused():
    with pytest.raises(Exception, match="run.out_dir"):
        load_config(None, ["run.out_dir="])


def test_an_unwritable_run_or_checkpoint_folder_is_found_before_the_work(tmp_path):
    probe_writable(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints"]  # no probe left behind
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match="cannot write into"):  # a file where the folder should be
        probe_writable(tmp_path / "file")
    (tmp_path / "ro" / "checkpoints").mkdir(parents=True)
    (tmp_path / "ro" / "checkpoints").chmod(0o500)
    try:
        if os.access(tmp_path / "ro" / "checkpoints", os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only folder stays writable")
        with pytest.raises(RunFolderError, match=r"cannot write into .*checkpoints"):
            probe_writable(tmp_path / "ro")
    finally:
        (tmp_path / "ro" / "checkpoints").chmod(0o700)
