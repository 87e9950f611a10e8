"""`coordexp-rl bench stage1`: the in-process learning curve prints one JSON line per evaluation."""

import json

import pytest

from coordexp_rl.cli import main
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.data.stream import BatchStream
from learner.learner import Learner


def test_bench_stage1_prints_a_scored_line_per_evaluation(tiny_model_dir, synth_dir, capsys):
    overrides = [f"model.path={tiny_model_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                 f"data.val={synth_dir / 'val.jsonl'}", "stage1.steps=3", "optim.batch_size=2", "eval.max_samples=2",
                 "rollout.max_new_tokens=16"]
    rc = main(["bench", "stage1", "--every", "2", *overrides])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [2, 3]  # every 2 steps and at the end
    # The same learner on the same seeded stream, here: "loss" is the mean over the steps so far.
    cfg = load_config(None, overrides)
    learner = Learner(cfg, tiny_model_dir)
    stream = BatchStream(load_samples(synth_dir / "train.jsonl", synth_dir), 2, cfg.run.seed)
    losses = [learner.stage1_step(stream.next_batch())["loss/total"] for _ in range(3)]
    assert [line["loss"] for line in lines] == pytest.approx([sum(losses[:2]) / 2, sum(losses) / 3], abs=2e-4)
    for line in lines:
        assert line["s_per_step"] == pytest.approx(line["train_s"] / line["step"], abs=0.06)
        assert line["parse_failure_rate"] in (0.0, 0.5, 1.0)  # 2 images


def test_bench_stage1_until_stops_early(tiny_model_dir, synth_dir, capsys):
    overrides = [f"model.path={tiny_model_dir}", f"data.train={synth_dir / 'train.jsonl'}",
                 f"data.val={synth_dir / 'val.jsonl'}", "stage1.steps=50", "optim.batch_size=2", "eval.max_samples=2",
                 "rollout.max_new_tokens=16"]
    assert main(["bench", "stage1", "--every", "1", "--until", "2", *overrides]) == 0
    assert [json.loads(line)["step"] for line in capsys.readouterr().out.splitlines()] == [1, 2]
