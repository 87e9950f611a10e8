"""The prepared GPU check (deploy/gpu_check.sh): its CPU dry run, skips, failures and time limits.

The GPU machine is lent rarely and briefly, so the check must work the first time it runs there: the dry
run executes every step's code on the CPU (tiny model, float32, gloo) and these tests read its JSON lines.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coordexp_rl.tools.gpu_check import STEPS, run_step
from coordexp_rl.tools.gpu_check.steps import gpu_test_files, junit_summary

REPO = Path(__file__).resolve().parents[2]
STEP_NAMES = [name for name, _ in STEPS]


def gpu_check(out: Path, *args: str, timeout: float = 600) -> tuple[int, list[dict]]:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "deploy/gpu_check.sh", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return proc.returncode, lines


def _finite_losses(metrics: dict) -> bool:
    return all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/"))


@pytest.mark.integration
def test_cpu_dry_run_runs_every_step_and_reports_each_as_json(tmp_path):
    code, lines = gpu_check(tmp_path / "out", "--cpu-dry-run")
    steps, summary = lines[:-1], lines[-1]
    assert [s["step"] for s in steps] == STEP_NAMES and summary["step"] == "summary"
    for s in steps:
        assert s["status"] in ("ok", "skipped"), s
        assert s["seconds"] > 0 and s["timeout_s"] > 0 and s["dry_run"] is True
    by = {s["step"]: s for s in steps}
    # The one step that needs CUDA itself: every gpu test skips here, with the reason.
    assert by["unit_tests"]["status"] == "skipped" and "CUDA" in by["unit_tests"]["reason"]
    assert all(by[s]["status"] == "ok" for s in STEP_NAMES if s not in ("unit_tests", "train_compiled"))
    # the compile is tested on the CPU by tests/learner/test_compile.py; the step measures it on a GPU only
    assert by["train_compiled"]["status"] == "skipped" and "test_compile.py" in by["train_compiled"]["reason"]
    assert by["env"]["result"]["packages"]["torch"] == torch.__version__
    train = by["train"]["result"]
    assert train["device"] == "cpu" and not train["learner"]["autocast"]
    for stage in ("stage1", "stage2"):
        assert _finite_losses(train[stage]["first"]) and _finite_losses(train[stage]["last"])
    assert train["stage2"]["last"]["loss/geo_self"] > 0  # the jittered-GT rows reach the geometric loss
    assert train["stage2"]["weight_syncs"] == 3 and train["stage1"]["steps_per_s"] > 0
    # model FLOPs by formula on the CPU; no MFU without a bf16 peak for the device
    assert train["stage1"]["model_tflops_per_s"] > 0 and train["stage1"]["mfu"] is None
    assert train["stage2"]["model_tflops_per_s"] > 0 and train["stage2"]["mfu"] is None
    larger = train["stage1_larger_batches"]["8"]  # Stage-1 again at a larger batch: rate, FLOPs, memory
    assert larger["batch_size"] == 8 and larger["steps_per_s"] > 0 and larger["model_tflops_per_s"] > 0
    phases = train["stage2"]["learn_breakdown_s"]  # the learner's time/* phases of the timed steps
    assert set(phases) == {"sequences_s", "prepare_s", "forward_s", "backward_s", "optimizer_s"}
    assert 0 < sum(phases.values()) <= train["stage2"]["learn_s"]
    runs = by["bench_loss"]["result"]["runs"]
    assert [r["chunk_size"] for r in runs] == [256]
    bench = runs[0]["report"]
    assert bench["chunk_size"] == 256 and bench["dtype"] == "bfloat16"  # the GPU run's dtype, on the CPU
    assert bench["settings"][0]["ours"]["loss"] == pytest.approx(bench["settings"][0]["naive"]["loss"],
                                                                 rel=bench["agreement_rtol"])
    assert [b["batch"] for b in by["generate"]["result"]["batches"]] == [1, 8, 16]
    assert all(b["tokens_per_s"] > 0 for b in by["generate"]["result"]["batches"])
    fsdp = by["fsdp"]["result"]
    assert fsdp["backend"] == "gloo" and fsdp["parameters_are_dtensors"] and fsdp["restored_weights_equal"]
    assert fsdp["loss_repeat_abs_diff"] == 0.0  # CPU float32: the repeated step is bit-identical
    assert code == 0 and summary["status"] == "ok" and summary["counts"] == {"ok": 6, "skipped": 2}
    assert summary["seconds"] < 420  # 135 s measured on a quiet 2-core machine; room for a loaded one
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the behaviour without a CUDA device")
def test_without_cuda_the_gpu_steps_are_skipped_with_the_reason(tmp_path):
    code, lines = gpu_check(tmp_path / "out", "--steps", "env", "build_model", "train", "fsdp")
    by = {s["step"]: s for s in lines}
    assert by["env"]["status"] == "ok" and by["env"]["result"]["cuda_available"] is False
    for step in ("build_model", "train", "fsdp"):
        assert by[step]["status"] == "skipped" and "no CUDA device" in by[step]["reason"], by[step]
    assert code == 0 and by["summary"]["counts"] == {"ok": 1, "skipped": 3}


def test_a_failing_step_is_recorded_and_the_next_step_still_runs(tmp_path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text("not json\n")  # breaks the data contract
    code, lines = gpu_check(tmp_path / "out", "--cpu-dry-run", "--work-dir", str(work), "--steps", "train",
                            "bench_loss")
    by = {s["step"]: s for s in lines}
    assert by["train"]["status"] == "failed" and "train.jsonl:1" in by["train"]["error"]
    assert "Traceback" in by["train"]["traceback"]
    assert by["bench_loss"]["status"] == "ok"  # the step after the failure
    assert code == 1 and by["summary"]["status"] == "failed" and by["summary"]["counts"] == {"failed": 1, "ok": 1}


def test_a_step_past_its_limit_is_killed_and_reported_as_timeout(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    line = run_step("env", 1, 0.3, tmp_path, out, dry_run=True)  # importing torch alone takes longer
    assert line["status"] == "timeout" and "0 s" in line["reason"] and line["seconds"] < 10


def test_the_budget_skips_steps_that_would_start_too_late(tmp_path):
    code, lines = gpu_check(tmp_path / "out", "--cpu-dry-run", "--budget-s", "5", "--steps", "env", "fsdp")
    assert [s["status"] for s in lines[:-1]] == ["skipped", "skipped"]
    assert all("time budget spent" in s["reason"] for s in lines[:-1]) and code == 0


def test_gpu_test_files_are_the_ones_with_gpu_marked_tests():
    files = gpu_test_files()
    assert {"tests/algorithms/test_gpu_losses.py", "tests/learner/test_gpu_learner.py",
            "tests/actors/test_gpu_hf_engine.py"} <= set(files)
    assert "tests/deploy/test_gpu_check.py" not in files  # names "pytest.mark.gpu" in this line only


def test_junit_summary_counts_and_skip_reasons(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="a" name="t1"/>'
        '<testcase classname="a" name="t2"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="b" name="t3"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="b" name="t4"><skipped message="no pydantic"/></testcase>'
        '</testsuite></testsuites>')
    s = junit_summary(xml)
    assert (s["tests"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (4, 1, 1, 0, 2)
    assert s["problems"] == [{"test": "a::t2", "kind": "failure", "message": "assert 1 == 2"}]
    assert [k["message"] for k in s["skips"]] == ["needs a CUDA device", "no pydantic"]
