"""Weight sync: seconds per sync by transport, against the in-process copy floor. `coordexp-rl bench sync`.

For each model size (random Qwen3-VL configs, about 1 M to 500 M parameters) the learner side (this
process) holds the model's tensors and a receiver Ray actor (another process, like a rollout actor)
holds a model of the same architecture. Three ways to put the learner's tensors into it:

- floor: ``load_state_dict`` of tensors that are already in the receiver's process (the copy that any
  sync ends with; no transport at all);
- object_store: ``ObjectStoreTransport`` (each bucket ``ray.put`` as it is packed, then the payload) +
  one control call, in which the receiver gets the buckets (zero-copy views of shared memory) and loads
  them (what the launcher does);
- broadcast: ``BroadcastTransport`` over a gloo weight group of 2 ranks + one control call, in which the
  receiver receives every bucket and loads it.

``bandwidth_ratio`` = floor seconds / transport seconds (1.0 = the transport costs nothing on top of the
copy). Times are medians of ``--repeats`` syncs after one warm-up. ``learner_extra_mb``: the largest rise
of this process's private memory (RssAnon, sampled every millisecond) during a sync, against
``--bucket-mb``: streamed buckets keep it near one bucket (the object store's shared memory is counted
apart, as the store's). ``receiver_device_mb``: the most the broadcast receiver held on the group's device
at once (its one wire buffer; on a GPU engine the sync waits in host memory), against the model's bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

# name -> (hidden, layers, intermediate, vocab): random Qwen3-VL text sizes (the small vision tower is fixed)
SIZES = {
    "1m": (128, 2, 256, 2048),
    "25m": (512, 6, 1536, 16384),
    "100m": (768, 12, 2688, 32768),
    "250m": (1024, 16, 3584, 65536),
    "500m": (1280, 20, 4480, 100352),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", default=["1m", "25m", "100m", "250m"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=64, help="weight_sync.bucket_mb (the shipped default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the learner's (and receiver's) model dtype")
    parser.add_argument("--sync-dtype", default=None, choices=["float32", "bfloat16"],
                        help="the engine dtype tensors are cast to on the way (model.dtype); default --dtype")


def model_config(size: str):
    from transformers import Qwen3VLConfig

    hidden, layers, inter, vocab = SIZES[size]
    heads = hidden // 64
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10],
                                 "mrope_interleaved": True}, tie_word_embeddings=True)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=256,
                  deepstack_visual_indexes=[0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
                         vision_end_token_id=vocab - 1)


def build_model(size: str, dtype: str, seed: int = 0):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(model_config(size)).to(getattr(torch, dtype)).eval()


class Receiver:
    """The rollout side: a model of the same architecture and the two transports' receive paths."""

    def __init__(self, size: str, dtype: str):
        from coordexp_rl.runtime import prepare_runtime

        prepare_runtime()
        self.model = build_model(size, dtype, seed=1)  # other values than the sender's
        self.broadcast = None  # a BroadcastTransport, made by join()

    def floor(self, payload) -> float:
        import ray

        from coordexp_rl.rollout.weight_transport import ObjectStoreTransport

        _, named, _ = ObjectStoreTransport().receive(payload, get=ray.get)
        state = {n: t.clone() for n, t in named}  # private memory, as a learner in this process would hold
        t0 = time.perf_counter()
        self.model.load_state_dict(state, strict=False)
        return time.perf_counter() - t0

    def load_object_store(self, payload) -> int:
        import ray

        from coordexp_rl.rollout.weight_transport import ObjectStoreTransport

        version, named, _ = ObjectStoreTransport().receive(payload, get=ray.get)
        self.model.load_state_dict(dict(named), strict=False)
        return version

    def join(self, addr: str, port: int) -> int:
        from coordexp_rl.rollout.weight_transport import BroadcastTransport, init_weight_group

        self.broadcast = BroadcastTransport(init_weight_group(addr, port, 1, 2, "gloo", 300))
        return 1

    def load_broadcast(self) -> int:
        version, named, _ = self.broadcast.receive()
        self.model.load_state_dict(dict(named), strict=False)
        return version

    def broadcast_device_mb(self) -> float:
        """The most the broadcast receiver held on its device at once (its wire buffer: one bucket)."""
        return self.broadcast.peak_device_bytes / 2**20

    def checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.model.state_dict().values()))


class PeakRss:
    """Largest rise of this process's RssAnon (private resident memory) while the block runs, in MiB."""

    def __init__(self):
        self.base = self.peak = 0
        self.running = False
        self.thread: threading.Thread | None = None
        self.extra_mb = 0.0

    def __enter__(self):
        self.base = self.peak = _rss_anon()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_anon())
        self.extra_mb = (self.peak - self.base) / 2**20


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_size(size: str, args: argparse.Namespace, receiver_cls) -> dict:
    import ray
    import torch

    from coordexp_rl.rollout.weight_transport import BroadcastTransport, ObjectStoreTransport, init_weight_group
    from learner.distributed import free_port

    sync_dtype = args.sync_dtype or args.dtype
    model = build_model(size, args.dtype)
    named = list(model.state_dict().items())
    nbytes = sum(t.numel() * getattr(torch, sync_dtype).itemsize for _, t in named)
    receiver = receiver_cls.remote(size, sync_dtype)
    port = free_port()
    joined = receiver.join.remote("127.0.0.1", port)
    sender = BroadcastTransport(init_weight_group("127.0.0.1", port, 0, 2, "gloo", 300), args.bucket_mb << 20)
    ray.get(joined)
    store = ObjectStoreTransport(args.bucket_mb << 20)

    def publish(version: int):
        return ray.put(store.send(version, named, dtype=sync_dtype, put=ray.put))  # noqa: F821 -- used before the del below

    times: dict[str, list[float]] = {"floor": [], "object_store": [], "broadcast": []}
    extra: dict[str, list[float]] = {"object_store": [], "broadcast": []}
    for rep in range(args.repeats + 1):
        version = rep + 1
        floor = ray.get(receiver.floor.remote(publish(version)))
        with PeakRss() as mem_obj:
            t0 = time.perf_counter()
            assert ray.get(receiver.load_object_store.remote(publish(version))) == version
            t_obj = time.perf_counter() - t0
        with PeakRss() as mem_bc:
            t0 = time.perf_counter()
            call = receiver.load_broadcast.remote()
            sender.send(version, named, dtype=sync_dtype)
            assert ray.get(call) == version
            t_bc = time.perf_counter() - t0
        if rep:  # the first round is the warm-up
            for key, value in (("floor", floor), ("object_store", t_obj), ("broadcast", t_bc)):
                times[key].append(value)
            extra["object_store"].append(mem_obj.extra_mb)
            extra["broadcast"].append(mem_bc.extra_mb)
    expected = float(sum(t.to(getattr(torch, sync_dtype)).double().sum() for _, t in named))
    got = ray.get(receiver.checksum.remote())
    assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), f"receiver weights differ: {got} vs {expected}"
    device_mb = ray.get(receiver.broadcast_device_mb.remote())
    ray.kill(receiver)
    med = {k: statistics.median(v) for k, v in times.items()}
    del model, named
    return {"size": size, "parameters": _params(size), "bytes": nbytes,
            "seconds": {k: round(v, 4) for k, v in med.items()},
            "times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "bandwidth_ratio": {k: round(med["floor"] / med[k], 4) for k in ("object_store", "broadcast")},
            "gb_per_s": {k: round(nbytes / med[k] / 1e9, 3) for k in med},
            "learner_extra_mb": {k: round(max(v), 1) for k, v in extra.items()},
            "receiver_device_mb": {"broadcast": round(device_mb, 1)}}


def _params(size: str) -> int:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen3VLForConditionalGeneration(model_config(size)).parameters())


def run(args: argparse.Namespace) -> int:
    import os

    import ray
    import torch

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    receiver_cls = ray.remote(num_cpus=1)(Receiver)
    try:
        results = [measure_size(size, args, receiver_cls) for size in args.sizes]
    finally:
        ray.shutdown()
    print(json.dumps({
        "benchmark": "weight_sync", "dtype": args.dtype, "sync_dtype": args.sync_dtype or args.dtype,
        "bucket_mb": args.bucket_mb, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "method": "median seconds per sync after 1 warm-up; object_store = pack and ray.put bucket by bucket + one "
                  "call (get zero-copy, load_state_dict); broadcast = one call (receive every bucket over gloo, "
                  "load_state_dict) while this process packs and sends; floor = load_state_dict of tensors already "
                  "in the receiver; learner_extra_mb = peak RssAnon rise of this process during a sync; "
                  "receiver_device_mb = the broadcast receiver's largest wire buffer on the group's device",
        "sizes": results}, indent=2))
    return 0
