"""The design card's way in: `ray start --head` on 127.0.0.1, then `ray job submit -- python -m coordexp_rl.launch`.

Ray 2.60 turns token authentication on by default; the cluster and the client share one token file
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), which is the choice documented in docs/DEPLOY.md. The job runs
the default path (object-store weight sync, one learner rank); the scale-out path (broadcast over gloo, two
FSDP2 ranks) runs through the launcher in test_actor_restart.
"""

import json
import pathlib
import subprocess

import pytest

from coordexp_rl.tools.local_head import RAY, ROOT, launch_job, local_ray_head, token_env

pytestmark = pytest.mark.integration
SHORT_RUN = ["stage1.steps=4", "stage2.steps=4", "stage2.sync_every=2", "data.synth_train=32", "data.synth_val=8",
             "eval.max_samples=8", "rollout.max_new_tokens=48", "optim.batch_size=4",
             "eval.every=2", "eval.every_samples=3",  # curve points at step 2 (Stage-1) and 6 (Stage-2)
             "eval.best_metric=f1@0.5/f1", "run.keep_last=1"]  # the best point's checkpoint outlives keep_last


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, launch_cache):
    tmp_path = tmp_path_factory.mktemp("ray_head")
    env = token_env(tmp_path, COORDEXP_CACHE=str(launch_cache))
    with local_ray_head(env, num_cpus=2) as address:
        yield env, address


def test_ray_job_submit_runs_both_stages_syncs_and_evaluates(ray_head, tmp_path):
    env, dashboard = ray_head
    out = tmp_path / "run"
    job = subprocess.run(launch_job(dashboard, *SHORT_RUN, f"run.out_dir={out}"), env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    code, logs = job.returncode, job.stdout
    assert code == 0 and "succeeded" in logs, logs[-4000:]
    for line in ("stage1 done: 4 steps", "stage-2 done", "weight sync v1", "weight sync v3", "eval stage2"):
        assert line in logs, line
    assert (out / "report.md").read_text().count("| stage2 |") == 1
    curve = out / "eval" / "step-000002"  # eval.every: scored beside Stage-1 on 3 samples
    assert len((curve / "predictions.jsonl").read_text().splitlines()) == 3
    assert len((out / "eval" / "step-000006" / "predictions.jsonl").read_text().splitlines()) == 3  # in the EM loop
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["initial", "step-000002", "stage1", "step-000006", "stage2"]
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    scores = {s: results[f"step-{s:06d}"]["f1@0.5/f1"] for s in (2, 6)}
    assert best["step"] == max(scores, key=lambda s: (scores[s], -s)) and best["value"] == scores[best["step"]]
    assert (pathlib.Path(best["path"]) / "COMPLETE").is_file()  # kept although keep_last is 1
    for label in ("initial", "stage1", "stage2"):  # each evaluation leaves something to look at
        folder = out / "eval" / label
        assert (folder / "report.md").is_file() and (folder / "iou_histogram.png").is_file()
        assert len(list((folder / "overlays").glob("*.png"))) == 8
    stages = {line.split('"stage": "')[1].split('"')[0] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"stage1", "stage2", "sync", "eval", "rollout"} <= stages


def test_ray_job_submit_without_the_token_is_refused(ray_head):
    env, dashboard = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    job = subprocess.run([RAY, "job", "list", "--address", dashboard], env=env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    assert "authentication" in (job.stdout + job.stderr).lower()
