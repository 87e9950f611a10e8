"""`coordexp-rl bench stage1`: the in-process learning curve prints one JSON line per evaluation."""

import json

from coordexp_rl.cli import main


def test_bench_stage1_prints_a_scored_line_per_evaluation(tiny_model_dir, synth_dir, capsys):
    rc = main(["bench", "stage1", "--every", "2", f"model.path={tiny_model_dir}",
               f"data.train={synth_dir / 'train.jsonl'}", f"data.val={synth_dir / 'val.jsonl'}",
               "stage1.steps=3", "optim.batch_size=2", "eval.max_samples=2", "rollout.max_new_tokens=16"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines] == [2, 3]  # every 2 steps and at the end
    for line in lines:
        assert line["train_s"] > 0 and 0 <= line["constant/AP50"] <= 1 and line["parse_failure_rate"] is not None
