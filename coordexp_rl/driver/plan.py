"""What a run will do, before it starts (`python -m coordexp_rl.launch --dry-run`): placement per role,
memory per device against the device, the learning rate at the start and end of each stage; and the
schedule block of a GPU config's header (``schedule_comment``), every count in it derived from the settings."""

from __future__ import annotations

from coordexp_rl.config import Config, stage2_lr
from coordexp_rl.driver.placement import bundle_text, placement_groups
from coordexp_rl.modeling.memory import GPU_GB, checkpoint_gb, engine_budget, learner_budget, model_key
from learner.learner import lr_schedule


def describe_plan(cfg: Config) -> list[str]:
    """The plan's lines, plain text (the caller comments them out behind the resolved config)."""
    lines = ["plan:"]
    for role, (bundles, strategy) in placement_groups(cfg).items():
        what = "actor" if role == "rollout" else "rank"
        each = bundle_text(bundles[0]) if bundles else "{}"
        lines.append(f"  placement: {role}: {len(bundles)} {what}(s) x {each} ({strategy})")
    lines += ["  " + line for line in _lr_lines(cfg)]
    lines += ["  " + line for line in _memory_lines(cfg)]
    return lines


def _lr_lines(cfg: Config) -> list[str]:
    factor, lr, s1 = lr_schedule(cfg), cfg.optim.lr, cfg.stage1.steps
    out = []
    if s1:
        peak = f", peak {lr:.3g} at step {cfg.optim.warmup_steps}" if cfg.optim.warmup_steps else ""
        out.append(f"learning rate, Stage-1 ({s1} steps, {cfg.optim.schedule}): {lr * factor(0):.3g} at step 0"
                   f"{peak}, {lr * factor(s1 - 1):.3g} at step {s1 - 1}")
    if cfg.stage2.steps:
        source = "stage2.lr" if cfg.stage2.lr is not None else f"stage2.lr_ratio {cfg.stage2.lr_ratio:g} x optim.lr"
        out.append(f"learning rate, Stage-2 ({cfg.stage2.steps} steps, constant): {stage2_lr(cfg):.3g} ({source})")
        if cfg.stage2.allow_lr_above_stage1 and stage2_lr(cfg) > lr:
            out.append(f"WARNING: Stage-2's rate is above Stage-1's peak {lr:.3g} (stage2.allow_lr_above_stage1)")
    return out


def _memory_lines(cfg: Config) -> list[str]:
    try:
        model_key(cfg)
    except ValueError:
        return ["memory: not estimated (the arithmetic covers the released Qwen3-VL models, named by model.path)"]
    learner, engine = learner_budget(cfg), engine_budget(cfg)
    lines = [f"memory, learner: ~{learner['total']:.0f} GB per rank of {GPU_GB} GB",
             f"memory, rollout engine: ~{engine['total']:.1f} GB per GPU of {engine['limit']:.0f} GB "
             f"(rollout.gpu_memory_utilization {cfg.rollout.gpu_memory_utilization} x {GPU_GB} GB)"]
    if learner["total"] > GPU_GB:
        lines.append(f"WARNING: the learner needs ~{learner['total']:.0f} GB per rank, more than a {GPU_GB} GB GPU "
                     "(learner.world_size, learner.activation_checkpointing, optim.batch_size, rollout.max_model_len, "
                     "learner.micro_batch_tokens)")
    if engine["total"] > engine["limit"]:
        lines.append(f"WARNING: the rollout engine needs ~{engine['total']:.1f} GB, more than its "
                     f"{engine['limit']:.0f} GB (rollout.max_num_seqs, rollout.max_model_len, "
                     "rollout.gpu_memory_utilization)")
    return lines


# Facts of the world the schedule block uses (not settings): dataset sizes by file name, and token counts.
KNOWN_TRAIN_SETS = {"train2017": ("COCO train2017", 118_287)}
PIXELS_PER_IMAGE_TOKEN = 32 * 32  # 16 px patches, merged 2 x 2
PROMPT_TOKENS = 40  # chat template + the instruction, about
OBJECT_TOKENS = 10 + 1.75  # structure and coord tokens + a COCO category name's tokens on average


def schedule_comment(cfg: Config) -> str:
    """The schedule block of a GPU config's header (tests/deploy/test_configs.py finds it there verbatim)."""
    lr, s1, s2, batch = cfg.optim.lr, cfg.stage1.steps, cfg.stage2.steps, cfg.optim.batch_size
    factor, ln = lr_schedule(cfg), cfg.learner
    micro = batch // (ln.world_size * ln.accum_steps)
    name, images = next((v for k, v in KNOWN_TRAIN_SETS.items() if k in cfg.data.train), ("the training set", 0))
    epochs = (lambda n: f" = {n / images:.2f} epochs") if images else (lambda n: "")
    rows = batch * cfg.stage2.sync_every
    image_tokens = cfg.data.max_pixels // PIXELS_PER_IMAGE_TOKEN
    context = image_tokens + PROMPT_TOKENS + cfg.rollout.max_new_tokens
    sync_gb = engine_budget(cfg)["weights"]
    saves = (s1 + s2) // cfg.run.checkpoint_every if cfg.run.checkpoint_every else 0
    kept = min(saves, cfg.run.keep_last) if cfg.run.keep_last else saves
    lines = [
        "# Schedule, derived by coordexp_rl/driver/plan.py from the settings below (a test checks this block):",
        f"#   samples per optimizer step: optim.batch_size {batch} = {ln.world_size} ranks x "
        + (f"{batch // ln.world_size} in micro-batches of <= {ln.micro_batch_tokens:,} tokens "
           "(learner.micro_batch_tokens)" if ln.micro_batch_tokens
           else f"{ln.accum_steps} accumulation step(s) x {micro} per micro-batch"),
        f"#   Stage-1: {s1:,} steps x {batch} = {s1 * batch:,} samples{epochs(s1 * batch)}"
        + (f" of {name} ({images:,} images);" if images else ";"),
        f"#     lr {lr:g} after {cfg.optim.warmup_steps} warmup steps ({100 * cfg.optim.warmup_steps / s1:.1f} %), "
        f"{cfg.optim.schedule} down to {lr * factor(s1 - 1):.2g} at its last step",
        f"#   Stage-2: {s2:,} steps x {batch} = {s2 * batch:,} rollouts{epochs(s2 * batch)};",
        f"#     constant lr {stage2_lr(cfg):.2g} (stage2.lr_ratio {cfg.stage2.lr_ratio:g} x optim.lr); strict gating "
        f"for its first {cfg.matching.curriculum_steps:,} steps;",
        f"#     {s2 // cfg.stage2.sync_every} weight syncs of ~{sync_gb:.1f} GB (bf16) in "
        f"{cfg.weight_sync.bucket_mb} MB buckets = ~{sync_gb * 1000 / cfg.weight_sync.bucket_mb:.0f} each; "
        f"{rows} rows per weight version,",
        f"#     buffer.capacity {cfg.buffer.capacity} = {rows} x (max_staleness {cfg.buffer.max_staleness} + 1)",
        f"#   tokens: <= {cfg.data.max_pixels:,} px = {image_tokens} image tokens + ~{PROMPT_TOKENS} prompt + "
        f"{cfg.rollout.max_new_tokens:,} new = ~{context:,} <= max_model_len {cfg.rollout.max_model_len:,};",
        f"#     an object is ~{OBJECT_TOKENS:g} tokens: {int((cfg.rollout.max_new_tokens - 1) // OBJECT_TOKENS)} "
        "objects + the end of turn fit max_new_tokens (data.too_many_objects for more)",
        f"#   GPUs: rollout {cfg.rollout.num_actors} x {cfg.rollout.gpus_per_actor:g} + learner {ln.world_size} x "
        f"{ln.gpus:g} = {cfg.rollout.num_actors * cfg.rollout.gpus_per_actor + ln.world_size * ln.gpus:g}; "
        f"rollouts in flight: {cfg.rollout.num_actors} actors x {cfg.rollout.batch_size} = "
        f"{cfg.rollout.num_actors * cfg.rollout.batch_size};",
        f"#   CPUs: rollout {cfg.rollout.num_actors} x "
        f"{cfg.rollout.cpus_per_actor:g} = {cfg.rollout.num_actors * cfg.rollout.cpus_per_actor:g}, learner "
        f"{ln.world_size} x {ln.cpus:g} = {ln.world_size * ln.cpus:g}",
        f"#   checkpoints: every {cfg.run.checkpoint_every:,} steps, ~{checkpoint_gb(cfg):.0f} GB each (fp32 weights "
        f"+ AdamW moments): {saves} over the run, {kept} kept = ~{kept * checkpoint_gb(cfg):.0f} GB",
    ]
    return "\n".join(lines)
