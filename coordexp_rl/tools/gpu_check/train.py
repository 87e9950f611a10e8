"""Step ``train``: Stage-1 steps, then Stage-2 steps on transformers-engine rollouts, on one device.

The learner is ``learner.learner.Learner`` as the launcher builds it on a GPU (``learner.gpus=1``,
``model.dtype=bfloat16``: float32 master weights, bf16 autocast forward); the engine is
``actors.hf_engine.HFEngine`` in bfloat16 on the same GPU. No Ray: the loop below is what the rollout
actor, the buffer and the driver do, in one process.

Random weights write token soup, which never parses, so a Stage-2 batch on engine rollouts alone would
take only the parse-failure fallback (Stage-1 loss). Half of each Stage-2 batch is therefore engine
rollouts and half is "jittered GT" rows (the GT objects, boxes shifted 5 bins, in reverse order: what
tests/learner/test_learner.py uses), so matching, the self-context forward and the geometric loss run too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from coordexp_rl.tools.gpu_check.build import DATA, MAIN
from coordexp_rl.tools.gpu_check.common import (
    Profile,
    Skip,
    Timer,
    peak_memory,
    require,
    require_cuda,
    reset_peak,
    rounded,
)

KEYS = ("loss/total", "loss/ce_all", "loss/l1_coord", "loss/giou_coord", "loss/ce_gt", "loss/geo_self",
        "grad_norm", "tokens_per_s", "match/matched", "match/parse_failure_rate", "match/mean_iou")


def learner_overrides(p: Profile) -> list[str]:
    """The config of a GPU learner (one device, bf16 autocast), or its CPU float32 twin in the dry run.
    data.max_pixels is the images' area: they are seen whole (196 image tokens at 448 px), as the 2B config
    sees COCO images."""
    gpu = p.device == "cuda"
    return [f"learner.gpus={1 if gpu else 0}", f"model.dtype={'bfloat16' if gpu else 'float32'}",
            f"data.max_pixels={p.image_size ** 2}",
            f"optim.batch_size={p.batch_size}", "optim.lr=1e-5", "optim.warmup_steps=0",
            "loss.lambda_l1=1.0", "loss.lambda_giou=1.0", f"loss.ce_chunk_size={p.chunk_size}",
            f"rollout.max_new_tokens={p.max_new_tokens}"]


def load_data(work: Path):
    from coordexp_rl.data.loader import load_samples

    train = work / DATA / "train.jsonl"
    if not train.is_file():
        raise Skip(f"{train} is missing: the build_model step did not finish")
    return load_samples(train)


def run(work: Path, p: Profile) -> dict:
    require_cuda(p)
    require("pydantic", why="coordexp_rl.config and the data contract are pydantic models")
    samples = load_data(work)  # before the heavy imports: a missing or broken set fails in seconds
    from actors.hf_engine import HFEngine
    from coordexp_rl.config import load_config
    from coordexp_rl.rollout.engine import EngineConfig
    from learner.learner import Learner

    cfg = load_config(None, learner_overrides(p))
    out: dict = {"device": p.device, "autocast_bf16": p.device == "cuda", "batch_size": p.batch_size}
    with Timer() as t:
        learner = Learner(cfg, work / MAIN)
    params = learner.model.parameters()
    out["learner"] = {"load_s": round(t.s, 1), "param_dtype": str(next(params).dtype),
                      "autocast": learner.autocast, "device": str(learner.device)}
    if learner.autocast != (p.device == "cuda"):
        raise RuntimeError(f"the Learner's autocast is {learner.autocast} on {learner.device}")
    out["stage1"] = stage1(learner, samples, p)
    with Timer() as t:
        # from_config, as the launcher does: the engine's dtype (model.dtype) and image resize (data.max_pixels)
        # are the learner's
        engine = HFEngine(EngineConfig.from_config(cfg, work / MAIN, kind="hf", device=p.device))
    out["engine"] = {"load_s": round(t.s, 1), "dtype": str(engine.model.dtype)}
    out["stage2"] = stage2(learner, engine, samples, cfg, p)
    del engine
    out["stage1_larger_batches"] = larger_batches(learner, samples, p)
    return out


def larger_batches(learner, samples, p: Profile) -> dict:
    """Stage-1 at each of ``p.larger_batches`` (the same learner, so the steps continue its schedule): the
    rate, MFU and peak memory per batch size; a size that runs out of device memory is recorded as such and
    ends the list (a larger one would too)."""
    import torch

    out: dict = {}
    for batch in p.larger_batches:
        try:
            out[str(batch)] = stage1(learner, samples, p, batch)
        except torch.cuda.OutOfMemoryError as exc:
            learner.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            out[str(batch)] = {"out_of_memory": str(exc).splitlines()[0][:300]}
            break
    return out


def run_compiled(work: Path, p: Profile) -> dict:
    """``train``'s Stage-1 steps with learner.compile: the first step pays the compile (``first_step_s``), the
    timed ones show what it buys (compare ``train``'s ``stage1``, same batches). Not in the dry run: a CPU
    compile of the tiny model takes about a minute, and tests/learner/test_compile.py runs it there."""
    require_cuda(p)
    if p.device != "cuda":
        raise Skip("--cpu-dry-run: learner.compile is tested on the CPU by tests/learner/test_compile.py "
                   "(a minute's compile here); only its GPU speed is this step's")
    require("pydantic", why="coordexp_rl.config and the data contract are pydantic models")
    samples = load_data(work)
    from coordexp_rl.config import load_config
    from learner.learner import Learner

    with Timer() as t:
        learner = Learner(load_config(None, [*learner_overrides(p), "learner.compile=true"]), work / MAIN)
    return {"device": p.device, "batch_size": p.batch_size, "learner": {"load_s": round(t.s, 1)},
            "stage1": stage1(learner, samples, p)}


def stage1(learner, samples, p: Profile, batch_size: int | None = None) -> dict:
    from coordexp_rl.data.stream import BatchStream

    batch_size = batch_size or p.batch_size
    stream = BatchStream(samples, batch_size, seed=0)
    with Timer() as warm:
        first = learner.stage1_step(stream.next_batch())  # warm-up: kernels, allocator, autotuning, a compile
    batches = [stream.next_batch() for _ in range(p.stage1_steps - 1)]
    # model FLOPs from the timed steps' own sequences, built before the timer (no model needed)
    flops = sum(_step_flops(learner, learner.sequences.stage1(b, learner.step + i)) for i, b in enumerate(batches))
    reset_peak()
    with Timer() as t:
        steps = [learner.stage1_step(b) for b in batches]
    _check_finite("stage1", [first, *steps])
    return {"batch_size": batch_size, "steps": len(steps) + 1, "timed_steps": len(steps),
            "first_step_s": round(warm.s, 2), "steps_per_s": round(len(steps) / t.s, 3),
            "tokens_per_s": round(sum(m["tokens_per_s"] for m in steps) / len(steps), 1),
            **_throughput(flops, sum(m["compute/learner_tokens"] for m in steps), t.s),
            "first": _pick(first), "last": _pick(steps[-1]), **(peak_memory() or {})}


def _step_flops(learner, seqs) -> float:
    """Model FLOPs of a step on ``seqs`` (coordexp_rl/tools/gpu_check/mfu.py has the formula)."""
    from coordexp_rl.tools.gpu_check.mfu import model_shape, sequence_counts, step_flops

    shape = model_shape(learner.model, vision_trained=not learner.cfg.model.freeze_vision)
    image_token = learner.model.config.image_token_id
    return step_flops(shape, [sequence_counts(s, image_token, shape.spatial_merge) for s in seqs])


def _throughput(flops: float, tokens: float, seconds: float) -> dict:
    """Model FLOP/s, tokens/s (image tokens included) over the timed steps, and MFU against the device's
    bf16 peak: None for a device not in mfu.BF16_PEAK_FLOPS (the CPU among them)."""
    import torch

    from coordexp_rl.tools.gpu_check.mfu import bf16_peak_flops

    name = torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
    peak = bf16_peak_flops(name)
    return {"device_name": name, "model_flops_per_step": flops, "model_tflops_per_s": round(flops / seconds / 1e12, 6),
            "timed_tokens_per_s": round(tokens / seconds, 1),
            "bf16_peak_tflops": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else round(flops / seconds / peak, 4)}


def stage2(learner, engine, samples, cfg, p: Profile) -> dict:
    from coordexp_rl.rollout.engine import SamplingConfig

    sampling = SamplingConfig.from_config(cfg.rollout)
    by_id = {s.sample_id: s for s in samples}
    reset_peak()
    sync_s = _sync_weights(learner, engine)  # the engine starts from the Stage-1 weights, as in the launcher
    records, times = [], {"rollout_s": 0.0, "learn_s": 0.0, "sync_s": sync_s, "generated_tokens": 0}
    flops = 0.0
    for k in range(p.stage2_steps):
        batch = [samples[(k * p.batch_size + i) % len(samples)] for i in range(p.batch_size)]
        half = len(batch) // 2
        t0 = time.perf_counter()
        rows = engine_rows(engine, batch[:half], cfg.data.prompt, sampling, learner)
        times["rollout_s"] += time.perf_counter() - t0
        times["generated_tokens"] += sum(len(row.generated_ids) for row in rows)
        rows += [jittered_gt_row(learner, s) for s in batch[half:]]
        if k:  # the first step is a warm-up (as in Stage-1): its shapes are new to the allocator and kernels
            # model FLOPs of the step's own sequences (self-context and reordered GT), built untimed
            params = learner.curriculum.at(learner.stage2_steps)
            flops += _step_flops(learner, learner.sequences.stage2(rows, by_id, params).sequences)
        with Timer() as t:
            records.append(learner.stage2_step(rows, by_id))
        if k:
            times["learn_s"] += t.s
        times["sync_s"] += _sync_weights(learner, engine)
    _check_finite("stage2", records)
    n, timed = p.stage2_steps, records[1:]
    # where a timed step's time went: the learner's own phases (time/*, learner/step_timer.py), summed
    phases = {k.removeprefix("time/"): sum(m[k] for m in timed) for k in timed[0] if k.startswith("time/")}
    return {"steps": n, "timed_steps": len(timed),
            "rows_per_step": {"engine": p.batch_size // 2, "jittered_gt": p.batch_size - p.batch_size // 2},
            "learn_steps_per_s": round(len(timed) / times["learn_s"], 3),
            **_throughput(flops, sum(m["compute/learner_tokens"] for m in timed), times["learn_s"]),
            "learn_breakdown_s": rounded(phases, 4),
            "rollout_tokens_per_s": round(times["generated_tokens"] / max(times["rollout_s"], 1e-9), 1),
            "weight_syncs": n + 1, "sync_s_mean": round(times["sync_s"] / (n + 1), 3),
            **rounded(times, 3), "first": _pick(records[0]), "last": _pick(records[-1]), **(peak_memory() or {})}


def engine_rows(engine, samples, prompt: str, sampling, learner) -> list:
    """Generate and parse as the rollout actor does (actors/rollout_actor.py RolloutWorker._row)."""
    from coordexp_rl.data.loader import load_image
    from coordexp_rl.method.protocol import parse_ids
    from coordexp_rl.rollout.engine import GenerationRequest
    from coordexp_rl.rollout.schema import RolloutRow

    results = engine.generate([GenerationRequest(load_image(s), prompt, s.sample_id) for s in samples], sampling)
    rows = []
    for s, res in zip(samples, results):
        parsed = parse_ids(res.generated_ids, learner.tokenizer, learner.vocab)
        rows.append(RolloutRow(sample_id=s.sample_id, prompt_ids=res.prompt_ids, generated_ids=res.generated_ids,
                               logprobs=res.logprobs, objects=parsed.objects, parse_status=parsed.status,
                               finish_reason=res.finish_reason, weight_version=res.weight_version, engine="hf"))
    return rows


def jittered_gt_row(learner, sample):
    """A rollout that writes the GT boxes shifted by 5 bins in reverse order (it parses and matches)."""
    from coordexp_rl.data.loader import load_image
    from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
    from coordexp_rl.modeling.inputs import encode_prompt
    from coordexp_rl.rollout.schema import RolloutRow

    objects = [BoxObject(o.desc, tuple(min(999, b + 5) for b in o.bins)) for o in reversed(sample.objects)]
    prompt = encode_prompt(learner.processor, load_image(sample), learner.cfg.data.prompt)["input_ids"].tolist()
    generated = build_assistant_ids(objects, learner.tokenizer, learner.vocab)
    parsed = parse_ids(generated, learner.tokenizer, learner.vocab)
    return RolloutRow(sample_id=sample.sample_id, prompt_ids=prompt, generated_ids=generated, objects=parsed.objects,
                      parse_status=parsed.status, weight_version=learner.version, engine="jittered_gt")


def _sync_weights(learner, engine) -> float:
    """The learner's weights into the engine (float32 -> the engine's dtype), as one weight sync does."""
    with Timer() as t:
        version, named = learner.publish()
        engine.load_weights(named, version)
    return t.s


def _pick(metrics: dict) -> dict:
    return rounded({k: metrics[k] for k in KEYS if k in metrics})


def _check_finite(stage: str, records: list[dict]) -> None:
    bad = [(i, k, v) for i, m in enumerate(records) for k, v in m.items()
           if k.startswith("loss/") and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"{stage}: non-finite losses (step, term, value): {bad[:5]}")
