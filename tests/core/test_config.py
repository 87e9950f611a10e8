"""The config model: every default has one home (a default Config reaches every component unchanged), and
the loader refuses a key that does nothing."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from coordexp_rl.config import Config, ConfigError, load_config
from coordexp_rl.method.matching import MatchCurriculum
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig


def test_match_curriculum_takes_every_value_from_the_matching_section():
    m = Config().matching
    c = MatchCurriculum.from_config(m)
    assert (c.start_step, c.ramp_steps) == (0, m.curriculum_steps)
    for name in ("sem_cost_weight_start", "sem_cost_weight_end", "iou_thr_start", "iou_thr_end", "l1_thr_start",
                 "l1_thr_end"):
        assert getattr(c, name) == getattr(m, name), name


def test_engine_defaults_are_the_rollout_sections():
    cfg = Config()
    built = EngineConfig.from_config(cfg, "m")
    bare = EngineConfig("m")  # a test or bench that names only the folder gets the config's numbers too
    assert dataclasses.replace(bare, max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels) == built
    assert (built.gpu_memory_utilization, built.max_model_len, built.max_num_seqs, built.kind) == (
        cfg.rollout.gpu_memory_utilization, cfg.rollout.max_model_len, cfg.rollout.max_num_seqs, cfg.rollout.engine)
    assert EngineConfig.from_config(cfg, "m", kind="hf").kind == "hf"


def test_sampling_takes_every_value_from_the_rollout_section():
    r = Config().rollout
    s = SamplingConfig.from_config(r)
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed) == (
        r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.seed)


def test_infer_without_a_config_uses_the_config_defaults():
    from coordexp_rl.tools.infer import add_arguments, resolve_settings

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = resolve_settings(parser.parse_args(["--model", "m", "--data", "d", "--out", "o"]))
    cfg = Config()
    r = cfg.rollout
    assert (args.engine, args.batch_size, args.max_new_tokens, args.max_model_len, args.gpu_memory_utilization,
            args.tensor_parallel_size, args.dtype, args.prompt) == (
        r.engine, r.batch_size, r.max_new_tokens, r.max_model_len, r.gpu_memory_utilization, r.tensor_parallel_size,
        cfg.model.dtype, cfg.data.prompt)
    # "None" = the model folder's pixel bounds; one engine sequence per request of a batch
    assert (args.max_pixels, args.min_pixels, args.max_num_seqs) == (None, None, args.batch_size)


def test_learner_takes_matching_and_loss_values_from_the_config(tiny_model_dir):
    from learner.learner import Learner

    cfg = Config()
    learner = Learner(cfg, tiny_model_dir)
    assert learner.curriculum == MatchCurriculum.from_config(cfg.matching)
    s = learner.sequences.match_settings
    assert (s.geo_cost_weight, s.overlap, s.missing_policy, s.eos_weight, s.extra_eos_weight) == (
        cfg.matching.geo_cost_weight, cfg.matching.geometry, cfg.matching.missing_policy, cfg.loss.eos_weight,
        cfg.loss.extra_eos_weight)
    group = learner.optimizer.param_groups[0]
    assert (group["initial_lr"], group["weight_decay"]) == (cfg.optim.lr, cfg.optim.weight_decay)


@pytest.mark.parametrize("key", ["eval.interval=5", "eval.engine=vllm", "rollout.num_gpus=8", "nosection.x=1"])
def test_the_loader_refuses_a_key_that_does_nothing(key, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(key.split("=")[0].split(".")[-1])):
        load_config(None, [key])
    section, rest = key.split(".", 1)
    name, value = rest.split("=")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=f"{path}.*{name}"):
        load_config(path)


def test_every_config_field_is_read_by_the_code():
    """A knob that no code reads is a silent no-op (eval.every and eval.engine once were): each field's name
    must appear as an attribute access somewhere outside the config module."""
    root = Path(__file__).resolve().parents[2]
    source = "".join(p.read_text() for d in ("coordexp_rl", "actors", "learner") for p in (root / d).rglob("*.py")
                     if p.name != "config.py")
    unread = [f"{section}.{name}" for section, field in Config.model_fields.items()
              for name in field.annotation.model_fields if not re.search(rf"\.{name}\b", source)]
    assert unread == []


def test_several_config_files_layer_in_order_and_name_the_file_of_a_bad_key(tmp_path):
    """load_config([base, arm]): the arm's keys win, the base's other keys stay, overrides come last; an unknown
    key is reported with the file that holds it."""
    base, arm = tmp_path / "base.yaml", tmp_path / "arm.yaml"
    base.write_text("loss:\n  lambda_geo: 1.0\n  desc_weight: 2.0\nrun:\n  out_dir: runs/base\n")
    arm.write_text("loss:\n  lambda_geo: 3.0\nrun:\n  out_dir: runs/arm\n")
    cfg = load_config([base, arm], ["run.out_dir=runs/x"])
    assert (cfg.loss.lambda_geo, cfg.loss.desc_weight, cfg.run.out_dir) == (3.0, 2.0, "runs/x")
    assert load_config(str(base)) == load_config([base])  # one path, as before
    assert load_config([]) == load_config(None) == Config()
    arm.write_text("loss:\n  lambda_geo: 3.0\n  lambda_gep: 1.0\n")
    with pytest.raises(ConfigError, match=re.escape(f"{arm}: loss.lambda_gep: Extra inputs")):
        load_config([base, arm])
    dense = Path(__file__).resolve().parents[2] / "configs"
    layered = load_config([dense / "dense_cpu.yaml", dense / "ablations" / "gate_held.yaml"])
    assert (layered.data.synth_max_objects, layered.matching.iou_thr_end) == (10, 0.5)


def test_reproducible_stage2_requires_its_settings_and_names_each():
    """stage2.reproducible: one actor, on-policy, a sync per step, one engine call per learner batch; the error
    names every key to change (they are required, not set silently)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["stage2.reproducible=true", "rollout.num_actors=2", "optim.batch_size=4"])
    for needed in ("rollout.num_actors=1", "buffer.max_staleness=0", "stage2.sync_every=1", "rollout.batch_size=4"):
        assert needed in str(e.value)
    cfg = load_config(None, ["stage2.reproducible=true", "buffer.max_staleness=0", "stage2.sync_every=1"])
    assert cfg.stage2.reproducible and cfg.rollout.batch_size == cfg.optim.batch_size


def test_the_launcher_layers_config_files_given_twice(tmp_path, capsys):
    from coordexp_rl.driver.driver import add_arguments, run

    base, arm = tmp_path / "base.yaml", tmp_path / "arm.yaml"
    base.write_text("loss:\n  lambda_geo: 1.0\n  desc_weight: 2.0\n")
    arm.write_text("loss:\n  lambda_geo: 3.0\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--config", str(base), "--config", str(arm), "--dry-run"])) == 0
    shown = capsys.readouterr().out
    assert "lambda_geo: 3.0" in shown and "desc_weight: 2.0" in shown


# Out-of-range settings a new user tried (issue 31): each refused when the config loads, naming its key.
OUT_OF_RANGE = [
    "optim.lr=0", "optim.lr=-1e-3", "optim.lr=.nan", "optim.lr=.inf", "optim.grad_clip=0", "optim.batch_size=0",
    "optim.warmup_steps=-1", "stage1.steps=-5", "stage2.steps=-1", "stage2.sync_every=0", "stage2.lr=0",
    "stage2.lr_ratio=0", "rollout.num_actors=0", "rollout.batch_size=0", "rollout.max_new_tokens=0",
    "rollout.cpus_per_actor=0", "rollout.gpus_per_actor=-1", "rollout.top_p=0", "rollout.top_p=1.5",
    "rollout.temperature=-0.5", "rollout.gpu_memory_utilization=1.2", "rollout.gone_timeout_s=0",
    "buffer.capacity=0", "buffer.max_staleness=-1", "learner.world_size=0", "learner.cpus=0",
    "learner.accum_steps=0", "matching.iou_thr_start=1.5", "matching.l1_thr_end=-0.1", "coordexp.tau_start=0",
    "coordexp.top_k=1001", "loss.lambda_geo=-1", "loss.soft_ce_sigma=0", "loss.ce_chunk_size=0",
    "eval.max_samples=-1", "eval.max_samples=0", "run.log_every=0", "run.keep_last=-1", "run.checkpoint_every=-1",
    "weight_sync.timeout_s=0", "weight_sync.bucket_mb=0", "data.max_pixels=0", "data.synth_edge_prob=2",
    "data.synth_max_pair_iou=1.5", "data.synth_min_size=0", "loss.lambda_coord_ce_stage2=-1",
]


@pytest.mark.parametrize("override", OUT_OF_RANGE)
def test_an_out_of_range_setting_is_refused_naming_its_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_settings_that_do_not_fit_together_are_refused():
    with pytest.raises(ConfigError, match=r"data.synth_min_objects=5 > data.synth_max_objects=3"):
        load_config(None, ["data.synth_min_objects=5"])
    with pytest.raises(ConfigError, match=r"data.synth_min_size=0.5 > data.synth_max_size=0.4"):
        load_config(None, ["data.synth_min_size=0.5"])
    with pytest.raises(ConfigError, match=r"buffer.capacity=4 < optim.batch_size=8"):
        load_config(None, ["buffer.capacity=4"])
    load_config(None, ["buffer.capacity=4", "stage2.method=sft"])  # the SFT control reads no buffer
    with pytest.raises(ConfigError, match=r"rollout.per_image=2 with rollout.temperature=0"):
        load_config(None, ["rollout.per_image=2"])
    assert load_config(None, ["rollout.per_image=2", "rollout.temperature=0.7"]).rollout.per_image == 2
    load_config(None, ["stage1.steps=0", "stage2.steps=0", "eval.every=0"])  # zero steps: a stage skipped


def test_lora_is_refused_with_fsdp_and_named():
    with pytest.raises(ConfigError, match="model.lora.rank=8 with learner.sharding=fsdp is not supported"):
        load_config(None, ["model.lora.rank=8", "learner.sharding=fsdp"])
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        load_config(None, ["model.lora.rank=8", "model.lora.target_modules=[]"])
    assert load_config(None, ["model.lora.rank=8"]).model.lora.rank == 8
