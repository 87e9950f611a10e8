"""configs/*.yaml: every file loads, tiny_cpu.yaml is the defaults, the real-model arithmetic holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from coordexp_rl.config import Config, flat_settings, load_config
from coordexp_rl.driver.placement import placement_groups
from tests.deploy.packing import CONFIGS, GPU_CONFIGS, ROOT, all_config_files, bundles, config, pack

COCO_TRAIN_IMAGES = 118_287  # instances_train2017.json
NODE_8GPU = {"GPU": 8, "CPU": 96}  # p4de.24xlarge / the RayJob worker pod's Ray resources


def _diff_from_defaults(cfg: Config) -> dict:
    base, mine = flat_settings(Config().model_dump()), flat_settings(cfg.model_dump())
    return {k: v for k, v in mine.items() if base[k] != v}


def test_tiny_cpu_is_exactly_the_embedded_default():
    assert load_config(CONFIGS / "tiny_cpu.yaml") == load_config(None)
    # ...and spells out every key, so a default changed in config.py alone is noticed here.
    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    assert set(flat_settings(raw)) == set(flat_settings(Config().model_dump()))


@pytest.mark.parametrize("path", all_config_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path)
    assert bundles(cfg), path  # at least the learner's bundle


def test_all_expected_configs_exist():
    names = {str(p.relative_to(CONFIGS)) for p in all_config_files()}
    assert {"tiny_cpu.yaml", *GPU_CONFIGS, "ablations/ce_only.yaml", "ablations/stage2_sft.yaml",
            "ablations/no_coord_ce_stage2.yaml", "ablations/topk_expectation.yaml"} <= names


@pytest.mark.parametrize("name, expected", [
    ("ce_only.yaml", {"loss.lambda_l1": 0.0, "loss.lambda_giou": 0.0, "loss.lambda_geo": 0.0}),
    ("stage2_sft.yaml", {"stage2.method": "sft"}),
    ("stage2_sft_compute.yaml", {"stage2.method": "sft"}),  # `ablate` sets its stage2.steps (equal compute)
    ("coord_soft_ce.yaml", {"loss.lambda_soft_ce": 1.0}),
    ("coord_w1.yaml", {"loss.lambda_w1": 4.0}),
    ("gate_held.yaml", {"matching.iou_thr_end": 0.5, "matching.l1_thr_end": 0.02}),
    ("no_coord_ce_stage2.yaml", {"loss.lambda_coord_ce_stage2": 0.0}),
    ("topk_expectation.yaml", {"coordexp.top_k": 20}),
    ("canonical_gt.yaml", {"stage2.gt_order": "canonical"}),
    ("geo_on_gt.yaml", {"stage2.geo_context": "gt"}),
    ("gate_wide.yaml", {"matching.iou_thr_start": 0.1, "matching.iou_thr_end": 0.1, "matching.l1_thr_start": 0.05,
                        "matching.l1_thr_end": 0.05}),
    ("stage1_random_order.yaml", {"stage1.order": "random"}),
    ("gated_order.yaml", {"stage2.gt_order": "gated"}),
    ("gt_geometry.yaml", {"stage2.gt_geometry": True}),
    ("sft_plus_self_geo.yaml", {"stage2.gt_order": "canonical", "stage2.gt_geometry": True}),
    ("sampled_rollouts.yaml", {"rollout.temperature": 0.7}),
    ("two_per_image.yaml", {"rollout.temperature": 0.7, "rollout.per_image": 2}),
    ("light_stage1_geo.yaml", {"loss.lambda_l1": 1.0, "loss.lambda_giou": 0.0}),
])
def test_ablation_differs_from_tiny_cpu_only_in_its_keys(name, expected):
    diff = _diff_from_defaults(load_config(CONFIGS / "ablations" / name))
    assert diff.pop("run.out_dir") == f"runs/ablations/{name.removesuffix('.yaml')}"
    assert diff == expected


@pytest.mark.parametrize("name, gpus, nodes", [
    ("qwen3vl_2b_1node.yaml", 8, 1), ("qwen3vl_8b_1node.yaml", 8, 1), ("qwen3vl_8b_2nodes.yaml", 16, 2)])
def test_gpu_configs_fill_their_nodes(name, gpus, nodes):
    cfg = config(name)
    b = bundles(cfg)
    assert sum(x.get("GPU", 0) for x in b) == gpus
    assert len(b) == cfg.rollout.num_actors + cfg.learner.world_size  # one bundle per actor and per learner rank
    assert pack(strict_packed(cfg), [NODE_8GPU] * nodes) is not None
    assert pack(strict_packed(cfg), [NODE_8GPU] * (nodes - 1)) is None  # it really needs that many nodes


def strict_packed(cfg) -> list[dict]:
    """The rollout bundles, then the learner's STRICT_PACK group as the one node-sized piece it must be
    (CPUs and GPUs only: role pinning by node_resource is checked on the cluster files, test_ray_cluster.py)."""
    groups = placement_groups(cfg)
    (actors, a_strategy), (ranks, l_strategy) = groups["rollout"], groups["learner"]
    assert (a_strategy, l_strategy) == ("PACK", "STRICT_PACK")
    devices = [{k: v for k, v in a.items() if k in ("CPU", "GPU")} for a in actors]
    return devices + [{k: sum(r.get(k, 0) for r in ranks) for k in ("CPU", "GPU") if k in ranks[0]}]


def test_two_node_config_puts_the_learner_on_a_node_of_its_own():
    cfg = config("qwen3vl_8b_2nodes.yaml")
    where = pack(strict_packed(cfg), [NODE_8GPU, NODE_8GPU])
    learner_node = where[-1]
    assert [w for w in where[:-1] if w == learner_node] == []


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_arithmetic(name):
    cfg = config(name)
    assert cfg.model.path.startswith("/path/to/Qwen3-VL-") and cfg.model.path.endswith("-coord")
    assert cfg.model.dtype == "bfloat16"
    assert cfg.rollout.engine == "vllm" and cfg.rollout.gpus_per_actor == 1.0
    assert cfg.rollout.tensor_parallel_size == 1
    assert cfg.rollout.repetition_penalty == 1.0  # rollouts decode as evaluation does
    assert cfg.data.train.startswith("/") and cfg.data.val.startswith("/")  # every node resolves them alike
    assert cfg.run.out_dir.startswith("/shared/runs/")  # a filesystem all nodes see
    # ~60 objects x ~14 tokens fit in the generation budget; prompt (<= 400 image + ~40) + budget in the context.
    assert cfg.rollout.max_new_tokens >= 60 * 14
    assert cfg.rollout.max_model_len >= 400 + 40 + cfg.rollout.max_new_tokens
    assert cfg.rollout.max_num_seqs >= cfg.rollout.batch_size
    # Buffer holds exactly what the learner may still use: rows per version x (max_staleness + 1).
    assert cfg.buffer.capacity == cfg.optim.batch_size * cfg.stage2.sync_every * (cfg.buffer.max_staleness + 1)
    # Stage-1 is about one epoch of COCO train2017 (the comments say ~1.0).
    epochs = cfg.stage1.steps * cfg.optim.batch_size / COCO_TRAIN_IMAGES
    assert 0.95 < epochs < 1.1
    assert cfg.optim.warmup_steps < cfg.stage1.steps // 10
    assert cfg.eval.max_samples >= 5000  # the whole of val2017


# Settings whose default is sized for the tiny CPU model: a GPU config must set each in its YAML (or the
# key it is derived from), or the tiny value reaches a real run unnoticed.
TINY_SIZED = {
    "optim.lr": "rate", "optim.warmup_steps": "steps", "optim.batch_size": "batch",
    "stage1.steps": "steps", "stage2.steps": "steps", "stage2.sync_every": "steps",
    "matching.curriculum_steps": "steps", "model.dtype": "memory",
    "rollout.batch_size": "batch", "rollout.max_num_seqs": "batch", "rollout.max_new_tokens": "token limit",
    "rollout.max_model_len": "token limit", "rollout.gpu_memory_utilization": "memory",
    "rollout.gone_timeout_s": "timeout", "rollout.enforce_eager": "speed", "rollout.num_actors": "scale",
    "data.max_pixels": "token limit", "data.min_pixels": "token limit", "loss.ce_chunk_size": "memory",
    "loss.lambda_l1": "rate (tiny learns from scratch)", "loss.lambda_giou": "rate (tiny learns from scratch)",
    "buffer.capacity": "batch", "buffer.max_staleness": "steps", "weight_sync.bucket_mb": "memory",
    "weight_sync.timeout_s": "timeout", "learner.world_size": "scale", "learner.gpus": "scale",
    "run.checkpoint_every": "steps", "run.log_every": "steps", "eval.max_samples": "batch",
    "run.placement_timeout_s": "timeout",
}
DERIVED = {"stage2.lr": "stage2.lr_ratio"}  # set outright, or derived from the key named (x optim.lr)


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_set_or_derive_every_tiny_sized_setting(name):
    raw = flat_settings(yaml.safe_load((CONFIGS / name).read_text()))
    missing = [k for k in TINY_SIZED if k not in raw]
    missing += [k for k, source in DERIVED.items() if k not in raw and source not in raw]
    assert missing == [], f"{name} leaves tiny-model defaults in place: {missing}"
    for key in TINY_SIZED:  # no typo: each is a field of the config
        section, field = key.split(".")
        assert field in Config.model_fields[section].annotation.model_fields, key


@pytest.mark.parametrize("path", all_config_files(), ids=lambda p: p.name)
def test_stage2_never_runs_above_stage1_peak(path):
    from coordexp_rl.config import stage2_lr

    cfg = load_config(path)
    assert stage2_lr(cfg) <= cfg.optim.lr
    if path.name in GPU_CONFIGS:  # where the cosine ends
        assert stage2_lr(cfg) == pytest.approx(0.1 * cfg.optim.lr)


def test_stage2_lr_is_derived_from_stage1_and_a_rate_above_the_peak_is_refused():
    from coordexp_rl.config import ConfigError, stage2_lr

    assert stage2_lr(load_config(None, ["optim.lr=2e-5"])) == pytest.approx(2e-6)
    assert stage2_lr(load_config(None, ["optim.lr=2e-5", "stage2.lr_ratio=0.5"])) == pytest.approx(1e-5)
    assert stage2_lr(load_config(None, ["optim.lr=2e-5", "stage2.lr=3e-6"])) == pytest.approx(3e-6)
    with pytest.raises(ConfigError, match="stage2.lr=0.0001 is above Stage-1's peak optim.lr=1e-05"):
        load_config(None, ["optim.lr=1e-5", "stage2.lr=1e-4"])
    cfg = load_config(None, ["optim.lr=1e-5", "stage2.lr=1e-4", "stage2.allow_lr_above_stage1=true"])
    assert stage2_lr(cfg) == pytest.approx(1e-4)


def test_learning_rates_follow_model_size():
    """The larger model takes the smaller rate; one model gets one rate however many nodes it runs on."""
    lr = {name: config(name).optim.lr for name in GPU_CONFIGS}
    assert lr["qwen3vl_8b_1node.yaml"] == lr["qwen3vl_8b_2nodes.yaml"] < lr["qwen3vl_2b_1node.yaml"]
    assert {config(name).data.train for name in GPU_CONFIGS} == {config(GPU_CONFIGS[0]).data.train}


def test_model_path_override_reaches_the_config():
    cfg = config("qwen3vl_2b_1node.yaml", ["model.path=/ckpt/Qwen3-VL-2B-coord", "rollout.num_actors=2"])
    assert cfg.model.path == "/ckpt/Qwen3-VL-2B-coord"
    assert sum(x["GPU"] for x in bundles(cfg)) == 2 + 4


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordexp_rl.launch", *args, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["qwen3vl_8b_2nodes.yaml", "ablations/topk_expectation.yaml"])
def test_dry_run_prints_the_resolved_config_and_bundles(name):
    out = _dry_run("--config", f"configs/{name}")
    assert out.returncode == 0, out.stderr
    text, _, bundle_line = out.stdout.rstrip().rpartition("# placement bundles: ")
    assert Config.model_validate(yaml.safe_load(text)) == load_config(CONFIGS / name)
    assert json.loads(bundle_line) == bundles(load_config(CONFIGS / name))


def test_dry_run_prints_the_plan_every_gpu_config_fits_its_devices():
    """The plan: placement per role, Stage-1's and Stage-2's learning rates, memory per device; no GPU
    config is over its device (a warning would say so), and an oversized setting is warned about."""
    for name in GPU_CONFIGS:
        out = _dry_run("--config", f"configs/{name}")
        assert out.returncode == 0, out.stderr
        cfg = load_config(CONFIGS / name)
        assert f"# plan:\n#   placement: rollout: {cfg.rollout.num_actors} actor(s)" in out.stdout
        assert f"#   placement: learner: {cfg.learner.world_size} rank(s)" in out.stdout
        assert f"Stage-2 ({cfg.stage2.steps} steps, constant): {0.1 * cfg.optim.lr:.3g}" in out.stdout
        assert f"at step {cfg.optim.warmup_steps}, {0.1 * cfg.optim.lr:.3g} at step" in out.stdout  # cosine end
        assert "memory, learner: ~" in out.stdout and "WARNING" not in out.stdout
    over = _dry_run("--config", "configs/qwen3vl_8b_1node.yaml", "rollout.max_num_seqs=512")
    assert "WARNING: the rollout engine needs" in over.stdout and "rollout.max_num_seqs" in over.stdout
    tiny = _dry_run()
    assert "learning rate, Stage-2 (300 steps, constant): 0.0001 (stage2.lr_ratio 0.1 x optim.lr)" in tiny.stdout
    assert "memory: not estimated" in tiny.stdout


def test_dry_run_rejects_an_unknown_key_by_name():
    out = _dry_run("--config", "configs/qwen3vl_2b_1node.yaml", "rollout.num_gpus=8")
    assert out.returncode == 2
    assert "rollout.num_gpus" in out.stderr


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", None])
def test_rollouts_decode_as_evaluation_does_by_default(name):
    """Stage-2 learns from rollouts; they must be what evaluation measures (greedy, no penalty)."""
    import dataclasses

    from coordexp_rl.rollout.engine import SamplingConfig, evaluation_sampling

    cfg = load_config(CONFIGS / name if name else None)
    # a seed does not change greedy decoding
    rollout = dataclasses.replace(SamplingConfig.from_config(cfg.rollout), seed=None)
    assert rollout == evaluation_sampling(cfg.rollout.max_new_tokens)


# What a GPU config's comments may state outside its two derived blocks: facts of the hardware, the data
# and the method, not counts of its settings.
COMMENT_FACTS = re.compile("|".join([
    r"Qwen3-VL-\d+B", r"\b[28]B\b", r"A100/H100 80 GB", r"p4de\.24xlarge", r"(train|val)2017", r"METHOD \d+(\.\d+)?",
    r"640 px", r"FSDP2", r"one node with 8 GPUs", r"two nodes x 8 GPUs = 16 GPUs", r"\w+\.yaml",
    r"float32|bfloat16|bf16|fp32", r"Stage-[12]", r"max_staleness \+ 1", r"L1", r"`[^`]*`"]))  # `code`: commands


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_count_in_a_gpu_config_comment_is_derived(name):
    """The schedule block is what plan.schedule_comment derives (the memory block: test_memory_budget.py);
    any other comment carries no count of its own, so none can go stale when a setting changes."""
    from coordexp_rl.driver.plan import schedule_comment
    from coordexp_rl.modeling.memory import budget_comment

    cfg, text = config(name), (CONFIGS / name).read_text()
    block = schedule_comment(cfg)
    assert block in text
    rest = text.replace(block, "").replace(budget_comment(cfg), "")
    for line in rest.splitlines():
        comment = line.split("#", 1)[1] if "#" in line else ""
        if line.lstrip().startswith("min_pixels:"):  # an image side: N x N = the setting
            side = int(re.search(r"(\d+)x\1 px", comment).group(1))
            assert side * side == cfg.data.min_pixels
            comment = comment.replace(f"{side}x{side} px", "")
        assert not re.search(r"\d", COMMENT_FACTS.sub("", comment)), f"{name}: a count not derived: {line.strip()}"


def test_the_schedule_block_derives_from_the_settings():
    """Hand-worked for the 2B config: 15,000 x 8 samples over 118,287 images, 3,000 / 10 syncs."""
    from coordexp_rl.driver.plan import schedule_comment

    block = schedule_comment(config("qwen3vl_2b_1node.yaml"))
    assert "15,000 steps x 8 = 120,000 samples = 1.01 epochs of COCO train2017 (118,287 images)" in block
    assert "300 weight syncs" in block and "buffer.capacity 160 = 80 x (max_staleness 1 + 1)" in block
    assert "400 image tokens + ~40 prompt + 1,024 new = ~1,464 <= max_model_len 2,048" in block
    assert "87 objects" in block  # (1,024 - 1) // 11.75
    changed = schedule_comment(config("qwen3vl_2b_1node.yaml").model_copy(
        update={"stage2": config("qwen3vl_2b_1node.yaml").stage2.model_copy(update={"sync_every": 20})}))
    assert "150 weight syncs" in changed and "160 rows per weight version" in changed
    assert "4 ranks x 1 accumulation step(s) x 2 per micro-batch" in block
    budget = config("qwen3vl_2b_1node.yaml")
    budget = budget.model_copy(update={"learner": budget.learner.model_copy(update={"micro_batch_tokens": 8192})})
    assert "4 ranks x 2 in micro-batches of <= 8,192 tokens (learner.micro_batch_tokens)" in schedule_comment(budget)
