"""Stage-2 loss path: ours (chunked CE + coord-row CoordExp) vs naive (full-vocab logits), memory and time.

Both paths compute the same loss on one sequence of hidden states (T = objects x tokens-per-object,
4 coord positions per object) with Qwen3-VL's real vocabulary (151,669 base + 1,006 added tokens):
``CE(weighted) / weight_sum + geo_loss(CoordExp boxes, GT boxes)``, forward + backward, LM head trained.

- naive: ``logits = hidden @ W.T`` (T, V), ``F.cross_entropy``, then gather the coord columns of the
  coord positions and CoordExp.
- ours: :func:`coordexp_rl.method.losses.weighted_token_ce` (chunks of ``--chunk-size`` positions, gradients
  formed inside the forward) with the coord logits projected onto the 1000 coord rows only.

Every (setting, method) runs in a fresh subprocess so no allocator state carries over.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

QWEN3_VL_VOCAB = 151_669 + 1_006  # base tokenizer + 1000 coord + 6 structure tokens
COORD_START = 151_669  # coord token ids are one contiguous range after the base vocabulary

MEMORY_METHOD = {
    "cpu": "peak resident set size (VmHWM of /proc/self/status, reset through /proc/self/clear_refs) "
           "minus the resident size just before one forward+backward, in a fresh process per method; "
           "torch's CPU allocator does not cache, so RSS follows tensor allocations",
    "cuda": "torch.cuda.max_memory_allocated during one forward+backward minus memory_allocated before it",
}
# How close the two paths must agree (max |naive - ours| / max |ours|, loss and both gradients). float32:
# only summation order differs. bfloat16: the paths round logits and gradients at different points (chunks
# vs one product), a few units of bf16's 2^-8 precision (3.4-4.2e-3 measured on the CPU, 3.7-5.5e-3 on an H200).
AGREEMENT_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
TRANSIENT_NOTE = ("peak_transient_bytes = peak_bytes minus the bytes of the gradients both methods must "
                  "produce (hidden.grad and the LM head's (V, H) weight.grad, training state that exists in "
                  "either method); memory_ratio uses it, memory_ratio_raw uses peak_bytes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objects", type=int, nargs="+", default=[20, 100], help="objects per sequence")
    parser.add_argument("--tokens-per-object", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (Qwen3-VL-2B: 2048)")
    parser.add_argument("--vocab", type=int, default=QWEN3_VL_VOCAB)
    parser.add_argument("--chunk-size", type=int, default=_shipped_chunk_size(),
                        help="positions per CE chunk (ours); default: loss.ce_chunk_size of the shipped configs")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median), after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--freeze-lm-head", action="store_true", help="no gradient for the LM head weight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["ours", "naive", "time"], help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.worker:
        out = time_both(args) if args.worker == "time" else measure_memory(args, args.worker)
        print(json.dumps(out))
        return 0
    settings = []
    for n in args.objects:
        res = {m: _subprocess(args, n, m) for m in ("naive", "ours", "time")}
        ours, naive = res["ours"], res["naive"]
        for m in ("ours", "naive"):
            res[m].update(res["time"][m])  # time_s, times_s
        settings.append({
            "objects": n, "seq_len": n * args.tokens_per_object,
            "memory_ratio_raw": round(ours["peak_bytes"] / naive["peak_bytes"], 4),
            "memory_ratio": round(ours["peak_transient_bytes"] / naive["peak_transient_bytes"], 4),
            "time_ratio": round(ours["time_s"] / naive["time_s"], 4),
            "agreement": res["time"]["agreement"], "ours": ours, "naive": naive,
        })
    report = {
        "benchmark": "stage2_loss_path", "device": args.device, "dtype": args.dtype, "hidden": args.hidden,
        "vocab": args.vocab, "chunk_size": args.chunk_size, "tokens_per_object": args.tokens_per_object,
        "lm_head_trained": not args.freeze_lm_head, "torch_threads": torch.get_num_threads(),
        "memory_method": MEMORY_METHOD["cuda" if args.device.startswith("cuda") else "cpu"],
        "memory_note": TRANSIENT_NOTE,
        "agreement_rtol": AGREEMENT_RTOL[args.dtype],
        "time_method": f"median of {args.repeats} forward+backward per method after 1 warm-up each, both methods "
                       "in one process, alternating naive/ours so that load from other processes hits both alike",
        "settings": settings,
    }
    print(json.dumps(report, indent=2))
    return 0


def _subprocess(args: argparse.Namespace, objects: int, method: str) -> dict:
    cmd = [sys.executable, "-m", "coordexp_rl.tools.bench.loss", "--worker", method, "--objects", str(objects)]
    for flag in ("tokens_per_object", "hidden", "vocab", "chunk_size", "repeats", "device", "dtype", "seed"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.freeze_lm_head:
        cmd.append("--freeze-lm-head")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:  # the worker's own traceback, not just the command line
        raise RuntimeError(f"bench loss worker {method!r} ({objects} objects) exited {out.returncode}:\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inputs(args: argparse.Namespace) -> dict:
    """Random states for one sequence: object o spans 15 tokens, its coords at offsets 8..11."""
    g = torch.Generator().manual_seed(args.seed)
    n, tpo, H, V = args.objects[0], args.tokens_per_object, args.hidden, args.vocab
    T, dtype, dev = n * tpo, getattr(torch, args.dtype), args.device
    coord_pos = (torch.arange(n)[:, None] * tpo + 8 + torch.arange(4)[None, :]).reshape(-1)  # (4n,)
    targets = torch.randint(0, COORD_START, (T,), generator=g)
    targets[coord_pos] = COORD_START + torch.randint(0, 1000, (4 * n,), generator=g)
    weights = torch.ones(T)
    weights[coord_pos] = 1.5  # 1 + lambda_coord_ce
    xy = torch.rand(n, 2, generator=g) * 0.6
    gt = torch.cat([xy, xy + 0.05 + torch.rand(n, 2, generator=g) * 0.3], 1)
    return {
        "hidden": (torch.randn(T, H, generator=g) * 0.5).to(dev, dtype).requires_grad_(),
        "weight": (torch.randn(V, H, generator=g) * H ** -0.5).to(dev, dtype).requires_grad_(not args.freeze_lm_head),
        "targets": targets.to(dev), "weights": weights.to(dev), "coord_pos": coord_pos.to(dev), "gt": gt.to(dev),
        "coord_ids": torch.arange(COORD_START, COORD_START + 1000, device=dev),
    }


def _loss(x: dict, method: str, chunk_size: int) -> torch.Tensor:
    from coordexp_rl.method.coordexp import coord_expectation
    from coordexp_rl.method.losses import geo_loss, weighted_token_ce

    if method == "ours":
        ce = weighted_token_ce(x["hidden"], x["weight"], x["targets"], x["weights"], chunk_size=chunk_size,
                               coord_positions=x["coord_pos"], coord_ids=x["coord_ids"])
        ce_loss, coord_logits = ce.loss_sum / ce.weight_sum, ce.coord_logits
    else:
        logits = x["hidden"] @ x["weight"].T  # (T, V)
        nll = F.cross_entropy(logits.float(), x["targets"], reduction="none")
        ce_loss = (nll * x["weights"]).sum() / x["weights"].sum()
        coord_logits = logits[x["coord_pos"]][:, x["coord_ids"]]  # (4n, 1000)
    boxes = coord_expectation(coord_logits).expectation.view(-1, 4)
    return ce_loss + geo_loss(boxes, x["gt"])


def _step(x: dict, method: str, chunk_size: int) -> None:
    for key in ("hidden", "weight"):
        x[key].grad = None  # zero_grad(set_to_none=True), as a training loop does
    _loss(x, method, chunk_size).backward()


def measure_memory(args: argparse.Namespace, method: str) -> dict:
    """Peak memory of one forward+backward (run in a fresh process per method)."""
    torch.manual_seed(args.seed)
    x = _inputs(args)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _step(x, method, args.chunk_size)  # warm-up (thread pools, kernels)
    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    sync()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _reset_peak_rss()
    _step(x, method, args.chunk_size)
    sync()
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss()) - base
    grads = sum(t.grad.nbytes for t in (x["hidden"], x["weight"]) if t.grad is not None)
    loss = float(_loss(x, method, args.chunk_size).detach())
    return {"peak_bytes": peak, "peak_transient_bytes": peak - grads, "gradient_bytes": grads,
            "peak_mib": round(peak / 2 ** 20, 1), "peak_transient_mib": round((peak - grads) / 2 ** 20, 1),
            "loss": round(loss, 6)}


def time_both(args: argparse.Namespace) -> dict:
    """Median forward+backward time of each method, alternating naive/ours in one process."""
    x = _inputs(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    methods = ("naive", "ours")
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args.repeats + 1):
        for m in methods:
            sync()
            t0 = time.perf_counter()
            _step(x, m, args.chunk_size)
            sync()
            if rep:  # the first round is the warm-up
                times[m].append(time.perf_counter() - t0)
    out = {m: {"time_s": round(statistics.median(t), 4), "times_s": [round(v, 4) for v in t]}
           for m, t in times.items()}
    out["agreement"] = agreement(x, args.chunk_size, AGREEMENT_RTOL[args.dtype])
    return out


def agreement(x: dict, chunk_size: int, rtol: float) -> dict:
    """Both methods' loss and gradients on the same inputs; raises unless they agree to ``rtol``."""
    got = {}
    for m in ("naive", "ours"):
        for key in ("hidden", "weight"):
            x[key].grad = None
        loss = _loss(x, m, chunk_size)
        loss.backward()
        got[m] = [loss.detach().float()] + [x[k].grad.float().clone() for k in ("hidden", "weight")
                                             if x[k].grad is not None]
    diffs = {}
    for name, a, b in zip(("loss", "hidden_grad", "weight_grad"), got["naive"], got["ours"]):
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        assert rel <= rtol, f"{name}: naive and ours differ by {rel:.2e} (relative to its max), above {rtol:g}"
        diffs[f"{name}_max_rel_diff"] = rel
    return diffs


def _shipped_chunk_size() -> int:
    from coordexp_rl.config import LossConfig

    return LossConfig().ce_chunk_size


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="coordexp-rl bench loss")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
