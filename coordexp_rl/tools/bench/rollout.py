"""Rollout throughput: `coordexp-rl bench rollout`. Three comparisons in one run, printed as JSON.

1. engines: the vLLM engine against the transformers (`generate`) engine on the same model, images and
   greedy settings, at each batch size (default 1, 8, 64): images/s, generated tokens/s, valid parsed
   objects/s, p50/p95 per-request latency (a request's latency is its batch's wall time: both engines
   return a batch at once). Both engines live in this process and take turns batch by batch. The two
   engines' outputs are asserted token-identical.
2. actor_overhead: a rollout actor's ``step`` (buffer permits + generate + parse + Arrow + buffer put)
   against the bare ``engine.generate`` of the same number of images in the same actor process, both
   through one Ray call, alternating: ``actor_overhead`` = step time / generate time.
3. scaling: rows/s of 1 rollout actor against 2 actors (1 CPU each) filling one buffer.

The model is the tiny Qwen3-VL (``--hidden``/``--layers`` make it larger) with its weights perturbed
(N(0, 0.1^2) on every matrix but the embeddings) so that greedy outputs vary per image, as in the
engine tests; ``--model DIR`` uses a trained folder instead (then valid objects/s is meaningful).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="a model folder; default: the perturbed tiny model")
    parser.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (128 = the default)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--images", type=int, default=64, help="images per batch size (batch 1: a quarter)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5, help="actor-overhead rounds (median)")
    parser.add_argument("--scaling-rows", type=int, default=96, help="rows per actor in the scaling run")
    parser.add_argument("--parts", nargs="+", default=["engines", "actor", "scaling"],
                        choices=["engines", "actor", "scaling"])


def prepare(args: argparse.Namespace) -> tuple[Path, list]:
    """The model folder and ``(sample_id, image_path, image_rel)`` items of the synthetic validation images."""
    from coordexp_rl.config import load_config
    from coordexp_rl.data.loader import load_samples
    from coordexp_rl.driver.assets import _build_once, _keyed_dir, synthetic_set

    cfg = load_config(None, ["data.synth_train=16", f"data.synth_val={args.images}"])
    val = synthetic_set(cfg) / "val.jsonl"
    items = [(s.sample_id, str(s.image_path), s.image_rel) for s in load_samples(val)]
    if args.model:
        return Path(args.model), items
    size = {"hidden": args.hidden, "layers": args.layers}
    model = _keyed_dir("bench-model", {**size, "perturb": 0.1})
    return _build_once(model, lambda d: _perturbed_tiny(d, size)), items


def _perturbed_tiny(folder: Path, size: dict) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from coordexp_rl.modeling.tiny import make_tiny_model

    make_tiny_model(folder, seed=0, **size)
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    state = {n: t + 0.1 * torch.randn(t.shape, generator=g) if t.dim() > 1 and "embed_tokens" not in n else t
             for n, t in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def engine_config(model: Path, kind: str, max_num_seqs: int):
    from coordexp_rl.rollout.engine import EngineConfig

    return EngineConfig(model_path=str(model), kind=kind, max_num_seqs=max_num_seqs, max_model_len=1024)


def sampling(args: argparse.Namespace):
    from coordexp_rl.rollout.engine import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.0)


def run_engines(engines: dict, requests: list, batch: int, sampling_cfg, vocab, tokenizer) -> dict[str, dict]:
    """Each engine on ``requests`` in batches of ``batch`` after one warm-up batch each, alternating engines
    batch by batch (and which goes first), so that load from other processes hits both alike. Every timed
    batch starts cold (``reset_caches``): vLLM's prefix / encoder caches would otherwise reuse the work of
    the warm-up and of earlier batch sizes on the same images, which rollouts after a weight sync cannot."""
    for engine in engines.values():
        engine.generate(requests[:batch], sampling_cfg)  # warm-up
    runs = {kind: {"latencies": [], "outputs": [], "seconds": 0.0} for kind in engines}
    for n, start in enumerate(range(0, len(requests), batch)):
        chunk = requests[start:start + batch]
        for kind in (list(engines) if n % 2 == 0 else list(engines)[::-1]):
            engines[kind].reset_caches()
            t0 = time.perf_counter()
            results = engines[kind].generate(chunk, sampling_cfg)
            dt = time.perf_counter() - t0
            runs[kind]["seconds"] += dt
            runs[kind]["latencies"] += [dt] * len(chunk)
            runs[kind]["outputs"] += [r.generated_ids for r in results]
    return {kind: _throughput(**run, vocab=vocab, tokenizer=tokenizer) for kind, run in runs.items()}


def _throughput(latencies: list[float], outputs: list[list[int]], seconds: float, vocab, tokenizer) -> dict:
    from coordexp_rl.method.protocol import parse_ids

    tokens = sum(len(o) for o in outputs)
    objects = sum(len(parse_ids(o, tokenizer, vocab).objects) for o in outputs)
    return {"images": len(outputs), "seconds": round(seconds, 4), "images_per_s": round(len(outputs) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "valid_objects_per_s": round(objects / seconds, 3),
            "valid_objects": objects, "p50_latency_s": round(statistics.median(latencies), 4),
            "p95_latency_s": round(_percentile(latencies, 95), 4), "_outputs": outputs}


def compare_engines(args: argparse.Namespace, model: Path, items: list) -> list[dict]:
    import torch
    from PIL import Image

    from actors.engines import make_engine
    from coordexp_rl.config import DEFAULT_PROMPT
    from coordexp_rl.method.coords import CoordVocab
    from coordexp_rl.rollout.engine import GenerationRequest

    images = [Image.open(path).convert("RGB") for _, path, _ in items]
    # Both engines in this process (vLLM runs in-process on CPU): vLLM first, as it sets the torch thread
    # count for serving, which the transformers engine then shares.
    engines = {kind: make_engine(engine_config(model, kind, max(args.batch_sizes))) for kind in ("vllm", "hf")}
    tok = engines["hf"].processor.tokenizer
    vocab = CoordVocab.from_tokenizer(tok)
    rows = []
    for batch in args.batch_sizes:
        n = max(batch, len(images) // 4) if batch == 1 else max(batch, len(images))
        requests = [GenerationRequest(images[i % len(images)], DEFAULT_PROMPT, f"s{i}") for i in range(n)]
        res = run_engines(engines, requests, batch, sampling(args), vocab, tok)
        v, h = res["vllm"], res["hf"]
        same = sum(a == b for a, b in zip(v.pop("_outputs"), h.pop("_outputs")))
        assert same == v["images"], (f"batch {batch}: vLLM and transformers differ on {v['images'] - same} of "
                                     f"{v['images']} images (greedy outputs must be token-identical)")
        rows.append({"batch": batch, "token_identical_images": same, "torch_threads": torch.get_num_threads(),
                     "vllm": v, "hf": h, "vllm_over_hf_images_per_s": round(v["images_per_s"] / h["images_per_s"], 3)})
        print(json.dumps({"engines": rows[-1]}), file=sys.stderr, flush=True)
    for engine in engines.values():
        engine.close()
    gc.collect()
    return rows


def _start_ray(num_cpus: int = 2):
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    return ray


def _actors(ray, model: Path, items: list, n: int, batch: int, args, buffer) -> list:
    from actors.rollout_actor import RolloutActor
    from coordexp_rl.config import DEFAULT_PROMPT

    actors = [RolloutActor.options(num_cpus=1).remote(
        engine_config(model, "vllm", batch), items, DEFAULT_PROMPT, sampling(args), batch_size=batch,
        actor_id=f"rollout-{i}", num_shards=n, shard_index=i, buffer=buffer) for i in range(n)]
    ray.get([a.weight_version.remote() for a in actors])  # started (engine start-up is not timed)
    return actors


def actor_overhead(args: argparse.Namespace, model: Path, items: list, batch: int = 8) -> dict:
    """The actor's ``step`` against the bare ``generate`` of the same next images, alternating; each timed
    call starts with cold engine caches (else the step would reuse the bare generate's prefixes)."""
    from actors.buffer import RolloutBuffer

    ray = _start_ray()
    try:
        buffer = RolloutBuffer.remote(capacity=10_000)
        (actor,) = _actors(ray, model, items, 1, batch, args, buffer)
        ray.get(actor.step.remote())  # warm-up of both paths
        ray.get(buffer.get.remote(batch, 10.0))
        bare, step = [], []
        for _ in range(args.repeats):
            ray.get(actor.reset_caches.remote())
            t0 = time.perf_counter()
            ray.get(actor.time_generate.remote(batch))  # the images the next step generates
            bare.append(time.perf_counter() - t0)
            ray.get(actor.reset_caches.remote())
            t0 = time.perf_counter()
            assert ray.get(actor.step.remote()) == batch
            step.append(time.perf_counter() - t0)
            ray.get(buffer.get.remote(batch, 10.0))
    finally:
        ray.shutdown()
    b, s = statistics.median(bare), statistics.median(step)
    return {"batch": batch, "engine_s": round(b, 4), "actor_step_s": round(s, 4), "actor_overhead": round(s / b, 4),
            "engine_times_s": [round(x, 4) for x in bare], "actor_times_s": [round(x, 4) for x in step]}


def scaling(args: argparse.Namespace, model: Path, items: list, batch: int = 8) -> dict:
    """Rows/s of 1 actor against 2 actors (1 CPU each) filling one buffer that this process drains."""
    from actors.buffer import RolloutBuffer

    out = {}
    for n in (1, 2):
        ray = _start_ray()
        try:
            buffer = RolloutBuffer.remote(capacity=10_000)
            actors = _actors(ray, model, items, n, batch, args, buffer)
            t0 = time.perf_counter()
            runs = [a.run.remote(args.scaling_rows) for a in actors]
            rows = sum(ray.get(runs))
            seconds = time.perf_counter() - t0
        finally:
            ray.shutdown()
        out[f"{n}_actors"] = {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 3)}
    out["speedup_2_vs_1"] = round(out["2_actors"]["rows_per_s"] / out["1_actors"]["rows_per_s"], 3)
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run(args: argparse.Namespace) -> int:
    import torch

    model, items = prepare(args)
    report = {"benchmark": "rollout", "model": str(model), "max_new_tokens": args.max_new_tokens, "greedy": True,
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    parts = {"engines": compare_engines, "actor": actor_overhead, "scaling": scaling}
    for name in args.parts:  # one failed part (e.g. Ray not starting on a loaded machine) keeps the others
        try:
            report[name] = parts[name](args, model, items)
        except Exception as exc:  # noqa: BLE001 -- reported in the JSON, and the exit code
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)  # progress, in case a later part hangs
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return int(any("error" in report[name] for name in args.parts if isinstance(report[name], dict)))
