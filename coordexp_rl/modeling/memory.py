"""GPU memory arithmetic for the shipped Qwen3-VL configs: the figures their comments quote, derived here.

``budget_comment(cfg)`` renders the memory block that each GPU config carries verbatim; a test checks the
file against it, so a comment cannot drift from the settings. Everything here is arithmetic from the
model's config numbers and the run's settings; none of it is measured on a GPU.

Learner (per rank, FSDP2 over ``learner.world_size`` ranks, learner/distributed.py): parameters stay
float32 (master weights), so each parameter costs 4 B of weights, each trainable one 4 B of gradient and
8 B of AdamW moments, all divided by the ranks. On top: what FSDP unshards at a time (the root group, i.e.
embeddings, LM head and the other parameters outside the per-layer groups, for the whole step, with its
gradients; two decoder layers with prefetch) and activations of one micro-batch (its most tokens under
learner.accum_steps, learner.micro_batch_tokens and learner.packing: ``micro_batch_tokens``). Activations
use Korthikanti et al.'s ~34 B per token per hidden unit per decoder layer (bf16 autocast, flash-style
attention without the s^2 term: eager's scores and the dense mask of a packed row on sdpa are not counted);
with activation checkpointing only each layer's float32 input is kept, plus one layer being recomputed.
Stage-2 forwards two sequences per rollout (self-context + reordered GT).

LoRA (model.lora, learner/lora.py): the base stays in float32 but frozen, so only the adapters, the coord
and structure token rows (and an unfrozen vision tower) cost gradients and AdamW moments, and a checkpoint
holds only those: 8B trains replicated on one GPU per rank, where a full fine-tune needs FSDP over several.

>>> round(count_params(QWEN3VL["8b"])["text"] / 1e9, 2)
8.2
"""

from __future__ import annotations

GB = 1e9
GPU_GB = 80  # A100 / H100 80 GB
CUDA_OVERHEAD_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: an assumption, not measured
ACT_BYTES = 34  # per token x hidden x decoder layer, no checkpointing (bf16; see the docstring)

# Config numbers of the released checkpoints (config.json), plus the rows that `add-coord-tokens` adds:
# 151,669 tokens + 1,000 coord + 6 structure = 152,675 (the checkpoints' own 151,936 rows are padding).
VOCAB_WITH_COORDS = 152_675
QWEN3VL = {
    "2b": {"name": "Qwen3-VL-2B",
           "text": dict(hidden=2048, layers=28, intermediate=6144, heads=16, kv_heads=8, head_dim=128, tied=True),
           "vision": dict(depth=24, hidden=1024, intermediate=4096, out_hidden=2048, deepstack=3, positions=2304)},
    "8b": {"name": "Qwen3-VL-8B",
           "text": dict(hidden=4096, layers=36, intermediate=12288, heads=32, kv_heads=8, head_dim=128, tied=False),
           "vision": dict(depth=27, hidden=1152, intermediate=4304, out_hidden=4096, deepstack=3, positions=2304)},
}
PATCH_VOXELS = 3 * 2 * 16 * 16  # RGB x temporal patch 2 x 16 x 16 px: the patch embedding's input
MERGE = 4  # spatial merge 2 x 2: the merger sees 4 vision tokens at once


def count_params(spec: dict, vocab: int = VOCAB_WITH_COORDS) -> dict[str, int]:
    """Parameter counts of a Qwen3-VL from its config numbers: text, vision, and the pieces FSDP needs."""
    t, v = spec["text"], spec["vision"]
    h, q, kv = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 2 * t["head_dim"] + 3 * h * t["intermediate"] + 2 * h
    embed = vocab * h
    root_text = embed * (1 if t["tied"] else 2) + h  # embeddings, LM head, final norm
    d, i, m = v["hidden"], v["intermediate"], v["hidden"] * MERGE
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * i + i) + (i * d + d)
    merger = m * m + m + m * v["out_hidden"] + v["out_hidden"]
    root_vision = (PATCH_VOXELS * d + d) + v["positions"] * d + (2 * d + merger) + v["deepstack"] * (2 * m + merger)
    text = t["layers"] * layer + root_text
    vision = v["depth"] * block + root_vision
    return {"text": text, "vision": vision, "total": text + vision, "layer": layer, "embed": embed,
            "root_text": root_text, "root_vision": root_vision}


TRAINED_TOKENS = 1006  # LoRA trains these rows of the embeddings and LM head: 1000 coord + 6 structure tokens


def lora_params(spec: dict, lora) -> int:
    """Parameters LoRA trains besides a vision tower: rank x (in + out) per adapted projection and layer, and
    the coord rows (twice when the LM head is untied). ``lora``: the config's model.lora (rank > 0)."""
    t = spec["text"]
    h, q, kv, i = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"], t["intermediate"]
    sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),  # (in, out)
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    unknown = sorted(set(lora.target_modules) - set(sizes))
    if unknown:
        raise ValueError(f"model.lora.target_modules {unknown}: this arithmetic knows the text model's {list(sizes)}")
    adapters = t["layers"] * sum(lora.rank * sum(sizes[m]) for m in lora.target_modules)
    return adapters + TRAINED_TOKENS * h * (1 if t["tied"] else 2)


def trainable_params(cfg) -> int:
    """Parameters with gradients and AdamW state: the whole model (or its text part with the vision tower
    frozen), or under LoRA the adapters and coord rows (plus an unfrozen vision tower)."""
    spec = QWEN3VL[model_key(cfg)]
    p = count_params(spec)
    vision = 0 if cfg.model.freeze_vision else p["vision"]
    return lora_params(spec, cfg.model.lora) + vision if cfg.model.lora.rank else p["text"] + vision


def model_key(cfg) -> str:
    """Which released model a config trains, from its model.path (".../Qwen3-VL-8B-...")."""
    for key, spec in QWEN3VL.items():
        if spec["name"].lower() in cfg.model.path.lower():
            return key
    raise ValueError(f"model.path {cfg.model.path!r} names none of {[s['name'] for s in QWEN3VL.values()]}")


def checkpoint_gb(cfg) -> float:
    """A checkpoint's size (GB): float32 weights of the whole model (LoRA: of the trained tensors only) +
    AdamW's two moments of the trained part."""
    p, trainable = count_params(QWEN3VL[model_key(cfg)]), trainable_params(cfg)
    return (4 * (trainable if cfg.model.lora.rank else p["total"]) + 8 * trainable) / GB


def micro_batch_tokens(cfg) -> tuple[int, str]:
    """The most tokens one micro-batch's forward holds on a learner rank, and which rule bounds it (the
    phrase ``budget_comment`` prints). Stage-2 is the larger stage: two sequences per rollout (self-context +
    reordered GT), each at most rollout.max_model_len = L tokens; micro = optim.batch_size / (learner.world_size
    x learner.accum_steps) rollouts per micro-batch.

    learner.micro_batch_tokens = 0: a fixed count, 2 x micro x L (padded: rows x the longest; packed: the
    sum, no more at worst). A budget B > 0 (accum_steps is then 1, micro is the rank's share;
    learner/batching.py micro_batches): a micro-batch takes sequences while rows x the longest (packed: the
    sum) stays <= B, and a longer sequence goes alone, so a forward holds min(max(B, L), 2 x micro x L).
    E.g. 2 rollouts per rank, L 2,048, B 3,000 -> 3,000; B 1,000 -> 2,048 (one sequence); B 10,000 -> 8,192.
    """
    lr, L = cfg.learner, cfg.rollout.max_model_len
    micro = cfg.optim.batch_size // (lr.world_size * lr.accum_steps)
    share = 2 * micro * L  # every sequence the micro-batch (under a budget: the rank) can hold, at full length
    budget = lr.micro_batch_tokens
    if not budget:
        return share, (f"{micro} rollout(s) per micro-batch x 2 sequences x {L:,} tokens"
                       + (", packed in one row" if lr.packing else ""))
    if budget >= share:
        return share, (f"the rank's {2 * micro} sequences x {L:,} tokens in one micro-batch "
                       f"(learner.micro_batch_tokens {budget:,})")
    if budget < L:
        return L, f"one sequence alone ({L:,} tokens > learner.micro_batch_tokens {budget:,})"
    layout = "packed: the sum of lengths" if lr.packing else "padded: rows x the longest"
    return budget, f"<= {budget:,} tokens per micro-batch (learner.micro_batch_tokens; {layout})"


def learner_budget(cfg) -> dict[str, float]:
    """Bytes per learner rank (GB) for a config; keys as in ``budget_comment``. ``micro``: rollouts per
    micro-batch (under learner.micro_batch_tokens the rank's share); ``tokens``: micro_batch_tokens' bound."""
    spec = QWEN3VL[model_key(cfg)]
    t, lr = spec["text"], cfg.learner
    p, trainable = count_params(spec), trainable_params(cfg)
    lora = lora_params(spec, cfg.model.lora) if cfg.model.lora.rank else 0  # the adapters' own weights
    w = lr.world_size if lr.sharding == "fsdp" else 1
    micro = cfg.optim.batch_size // (lr.world_size * lr.accum_steps)
    tokens, _ = micro_batch_tokens(cfg)
    per_layer = tokens * t["hidden"] * ACT_BYTES
    if lr.activation_checkpointing:
        acts = t["layers"] * tokens * t["hidden"] * 4 + per_layer  # fp32 layer inputs + one layer recomputed
    else:
        acts = t["layers"] * per_layer
    ce = cfg.loss.ce_chunk_size * VOCAB_WITH_COORDS * 4 * 3  # fp32 logits, their softmax and gradient
    out = {"micro": micro, "tokens": tokens, "weights": 4 * (p["total"] + lora) / w / GB,
           "grads": 4 * trainable / w / GB, "adam": 8 * trainable / w / GB,
           "activations": (acts + ce + tokens * t["hidden"] * 4) / GB}
    out["sharded"] = out["weights"] + out["grads"] + out["adam"]
    # Unsharded at a time under FSDP: the root group with its gradients, and 2 layers (prefetch) + 1 layer's grads.
    out["unsharded"] = (8 * p["root_text"] + 4 * p["root_vision"] + 12 * p["layer"]) / GB if w > 1 else 0.0
    out["total"] = out["sharded"] + out["unsharded"] + out["activations"] + CUDA_OVERHEAD_GB
    return out


def engine_budget(cfg) -> dict[str, float]:
    """One rollout engine's GPU memory (GB): bf16 weights and the KV cache its concurrency needs."""
    spec = QWEN3VL[model_key(cfg)]
    t, r = spec["text"], cfg.rollout
    kv_per_token = 2 * t["layers"] * t["kv_heads"] * t["head_dim"] * 2  # k and v, bf16
    weights = 2 * count_params(spec)["total"] / GB
    kv = r.max_num_seqs * r.max_model_len * kv_per_token / GB
    return {"weights": weights, "kv_per_token_kib": kv_per_token / 1024, "kv": kv, "total": weights + kv,
            "limit": r.gpu_memory_utilization * GPU_GB}


def budget_comment(cfg) -> str:
    """The memory block of a GPU config (tests/deploy/test_memory_budget.py finds it in the file verbatim)."""
    spec = QWEN3VL[model_key(cfg)]
    p, lb, eb, lr = count_params(spec), learner_budget(cfg), engine_budget(cfg), cfg.learner
    b = lambda x: f"{x / 1e9:.2f} B"  # noqa: E731
    frozen = " (vision frozen)" if cfg.model.freeze_vision else ""
    if cfg.model.lora.rank:  # gradients and AdamW only for the adapters, coord rows (and an unfrozen tower)
        tower = ", vision frozen" if cfg.model.freeze_vision else ""
        frozen = f" of {b(trainable_params(cfg))} trained params (LoRA rank {cfg.model.lora.rank}{tower})"
    return "\n".join([
        "# Memory, derived by coordexp_rl/modeling/memory.py from the settings below (a test checks this block;",
        "# nothing here is measured on a GPU):",
        f"#   {spec['name']}: {b(p['total'])} params (text {b(p['text'])}, vision {b(p['vision'])}), "
        f"{'tied' if spec['text']['tied'] else 'untied'} LM head, vocab {VOCAB_WITH_COORDS:,} with coord tokens",
        f"#   learner, per rank of {lr.world_size} ({lr.sharding}): fp32 weights {lb['weights']:.1f} GB + fp32 grads"
        f"{frozen} {lb['grads']:.1f} GB + AdamW m,v {lb['adam']:.1f} GB = {lb['sharded']:.1f} GB;",
        f"#     unsharded at a time (root group + grads, 2 layers + 1 layer's grads) {lb['unsharded']:.1f} GB;",
        f"#     activations of {micro_batch_tokens(cfg)[1]}{' (checkpointed)' if lr.activation_checkpointing else ''} "
        f"{lb['activations']:.1f} GB;",
        f"#     + {CUDA_OVERHEAD_GB:.0f} GB CUDA/NCCL (assumed) = ~{lb['total']:.0f} GB of {GPU_GB} GB",
        f"#   rollout engine, per GPU: bf16 weights {eb['weights']:.1f} GB + KV {cfg.rollout.max_num_seqs} seqs x "
        f"{cfg.rollout.max_model_len:,} tokens x {eb['kv_per_token_kib']:.0f} KiB = {eb['kv']:.1f} GB; "
        f"= {eb['total']:.1f} GB of {eb['limit']:.0f} GB ({cfg.rollout.gpu_memory_utilization} x {GPU_GB})",
        f"#   weight sync: {eb['weights']:.1f} GB of bf16 per engine"
        + (f", {2 * p['text'] / GB:.1f} GB once the frozen vision tower is there" if cfg.model.freeze_vision else ""),
    ])
