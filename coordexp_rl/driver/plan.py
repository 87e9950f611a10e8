"""What a run will do, before it starts (`python -m coordexp_rl.launch --dry-run`): placement per role,
memory per device against the device, the learning rate at the start and end of each stage."""

from __future__ import annotations

from coordexp_rl.config import Config, stage2_lr
from coordexp_rl.driver.placement import bundle_text, placement_groups
from coordexp_rl.modeling.memory import GPU_GB, engine_budget, learner_budget, model_key
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
                     "(learner.world_size, learner.activation_checkpointing, optim.batch_size, rollout.max_model_len)")
    if engine["total"] > engine["limit"]:
        lines.append(f"WARNING: the rollout engine needs ~{engine['total']:.1f} GB, more than its "
                     f"{engine['limit']:.0f} GB (rollout.max_num_seqs, rollout.max_model_len, "
                     "rollout.gpu_memory_utilization)")
    return lines
