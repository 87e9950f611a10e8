"""`coordexp-rl infer --config FILE`: the run's decoding settings, so inference equals the in-run evaluation."""

from __future__ import annotations

import argparse

import yaml

from coordexp_rl.cli import main
from coordexp_rl.config import Config, load_config
from coordexp_rl.rollout.engine import EngineConfig
from coordexp_rl.rollout.predict import predict
from coordexp_rl.tools.infer import add_arguments, resolve_settings
from tests.inference.conftest import PROMPT, read_jsonl, write_subset

RUN = {"model": {"dtype": "float32"},
       "data": {"prompt": PROMPT, "max_pixels": 128 * 128, "min_pixels": 32 * 32 * 3},
       "rollout": {"engine": "hf", "batch_size": 3, "max_new_tokens": 20, "max_model_len": 512, "max_num_seqs": 6,
                   "gpu_memory_utilization": 0.7}}


def write_config(path, synth_dir):
    run = {**RUN, "data": {**RUN["data"], "val_image_root": str(synth_dir)}}
    path.write_text(yaml.safe_dump(run))
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_settings(parser.parse_args(["--model", "m", "--data", "d", "--out", "o", *argv]))


def test_settings_come_from_the_config_and_flags_win(tmp_path, synth_dir):
    cfg_path = write_config(tmp_path / "run.yaml", synth_dir)
    args = parse("--config", str(cfg_path))
    engine = EngineConfig.from_config(load_config(cfg_path), "m")  # what the launcher's rollout actors get
    for field in ("dtype", "device", "max_model_len", "max_num_seqs", "gpu_memory_utilization",
                  "tensor_parallel_size", "max_pixels", "min_pixels"):
        assert getattr(args, field) == getattr(engine, field), field
    assert (args.engine, args.batch_size, args.max_new_tokens, args.prompt) == ("hf", 3, 20, PROMPT)
    assert str(args.image_root) == str(synth_dir)
    flagged = parse("--config", str(cfg_path), "--max-new-tokens", "7", "--engine", "vllm", "--max-pixels", "4096")
    assert (flagged.max_new_tokens, flagged.engine, flagged.max_pixels) == (7, "vllm", 4096)
    bare = parse()  # without a config: the config's defaults, the model folder's pixels
    d = Config().rollout
    assert (bare.engine, bare.max_new_tokens, bare.max_pixels, bare.max_num_seqs) == \
        (d.engine, d.max_new_tokens, None, 8)


def test_infer_with_config_equals_the_in_run_evaluation(taught_dir, synth_dir, tmp_path):
    from actors.engines import make_engine
    from coordexp_rl.data.loader import load_samples

    cfg_path = write_config(tmp_path / "run.yaml", synth_dir)
    data = write_subset(synth_dir, tmp_path / "gt.jsonl", 4)
    out = tmp_path / "preds.jsonl"
    assert main(["infer", "--config", str(cfg_path), "--model", str(taught_dir), "--data", str(data),
                 "--out", str(out)]) == 0
    # The launcher's evaluation: RolloutActor.predict on an engine built by EngineConfig.from_config(cfg).
    cfg = load_config(cfg_path)
    engine = make_engine(EngineConfig.from_config(cfg, taught_dir))
    try:
        samples = load_samples(data, synth_dir)
        in_run = list(predict(engine, samples, cfg.data.prompt, batch_size=cfg.rollout.batch_size,
                              max_new_tokens=cfg.rollout.max_new_tokens))
        assert engine.processor.image_processor.size["longest_edge"] == 128 * 128
    finally:
        engine.close()
    assert read_jsonl(out) == in_run
    assert all(p["num_tokens"] <= 20 for p in in_run)


def test_infer_refuses_a_prompt_that_cannot_fit_before_starting_vllm(tiny_model_dir, synth_dir, tmp_path, capsys):
    data = write_subset(synth_dir, tmp_path / "gt.jsonl", 2)
    rc = main(["infer", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "p.jsonl"),
               "--image-root", str(synth_dir), "--max-new-tokens", "30", "--max-model-len", "40"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "gt.jsonl:1: sample" in err and "rollout.max_new_tokens=30" in err and "rollout.max_model_len=40" in err
    assert not (tmp_path / "p.jsonl").exists()
