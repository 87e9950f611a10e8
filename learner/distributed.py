"""The learner on W ranks: how the model is held (replicated or FSDP2-sharded), and the few collectives.

Data parallel without torch's DDP wrapper: every rank computes its loss as (local sum / GLOBAL
normaliser), so the SUM over ranks of the gradients is exactly the gradient of the one-rank loss on the
whole batch; gradients are all-reduced with SUM once per optimizer step (after all micro-batches), which
is what DDP does under ``no_sync``. We do not wrap in ``DistributedDataParallel`` because the losses read
the LM head outside the module's forward (chunked CE, CoordExp) and the forward goes through
``model.model``; DDP's reducer expects its own forward, and its averaging would need the loss scaled by W.

FSDP2 (``fully_shard`` per vision block, per decoder layer, then a root over a small wrapper whose forward
runs the model AND the losses, so the LM head is unsharded while the losses use it). Reductions are plain
sums (gradient divide factor 1): the same normalisation argument as above holds. Works on CPU with gloo
(torch 2.13; PREMUL_SUM is not supported by gloo, hence ``set_force_sum_reduction_for_comms``).

With one process and no process group, ``DistContext`` is rank 0 of 1 and every collective is a no-op.
"""

from __future__ import annotations

import logging
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import torch
import torch.distributed as dist

from coordexp_rl.rollout.rendezvous import tcp_store

log = logging.getLogger(__name__)

T = TypeVar("T")
Sharding = Literal["replicate", "fsdp"]


@dataclass(frozen=True)
class ParallelPlan:
    """How one learner rank trains (the same on every rank)."""

    sharding: Sharding = "replicate"  # "replicate": full model per rank (DDP-style); "fsdp": FSDP2 fully_shard
    accum_steps: int = 1  # micro-batches per optimizer step (per rank); the loss is the same for any value
    activation_checkpointing: bool = False  # recompute decoder activations in backward (HF gradient checkpointing)
    # FSDP2 mixed precision (bf16 parameters and all-gathers, float32 reductions; float32 master weights and
    # AdamW state): None = on when model.dtype is bfloat16 on CUDA; True forces it (the gloo test on CPUs)
    mixed_precision: bool | None = None

    def __post_init__(self):
        if self.sharding not in ("replicate", "fsdp"):
            raise ValueError(f"sharding must be 'replicate' or 'fsdp', got {self.sharding!r}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")


def split(items: Sequence[T], parts: int) -> list[list[T]]:
    """Contiguous, near-equal chunks (the first ones one longer), like numpy.array_split.

    >>> split(list("abcde"), 2)
    [['a', 'b', 'c'], ['d', 'e']]
    """
    n, r = divmod(len(items), parts)
    out, lo = [], 0
    for i in range(parts):
        hi = lo + n + (i < r)
        out.append(list(items[lo:hi]))
        lo = hi
    return out


class DistContext:
    """Rank, world size and the small collectives the learner needs (no-ops when world_size == 1).

    Scalars and Python objects go over a gloo group (CPU), gradients over the default group (NCCL on GPUs).
    """

    def __init__(self):
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.cpu_group = None
        if self.enabled:
            self.cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch."""
        return split(items, self.world_size)[self.rank]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Element-wise sum over ranks of a {name: float} dict (same keys, same order on every rank)."""
        if not self.enabled or not values:
            return dict(values)
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cpu_group)
        return dict(zip(values, t.tolist()))

    def min(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return float(t)

    def max(self, value: float) -> float:
        return -self.min(-value)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled over the gloo group)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.cpu_group)

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
        """SUM the gradients of replicated parameters over ranks, in flat buckets (one call per bucket).

        A parameter without a gradient on this rank (unused by its micro-batches) counts as zeros, so all
        ranks issue the same collectives.
        """
        if not self.enabled:
            return
        params = list(params)
        # Which parameters got a gradient on some rank; one unused on every rank keeps grad None, as on
        # one rank (AdamW skips it, so its step count and bias correction stay the same).
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(used, op=dist.ReduceOp.SUM, group=self.cpu_group)
        grads = []
        for p, n in zip(params, used.tolist()):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
            if n:
                grads.append(p.grad)
        for bucket in _buckets(grads, bucket_bytes):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
    bucket, used = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (used + nbytes > bucket_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, used = [], 0
        bucket.append(t)
        used += nbytes
    if bucket:
        yield bucket


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, *,
                       use_cuda: bool, timeout_s: float = 1800.0, local_device: int = 0) -> None:
    """Join the learner's default process group: NCCL on GPUs, gloo on CPUs (TCP rendezvous at rank 0).
    ``local_device``: this rank's GPU among the visible ones (the node's learner GPUs, group.share_node_gpus)."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; one learner rank per process")
    if use_cuda:
        torch.cuda.set_device(local_device)
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=timeout_s)
    store = tcp_store(master_addr, master_port, world_size, rank, timeout)  # listens on master_addr only
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    log.info("learner rank %d/%d joined (%s, %s:%d)", rank, world_size, backend, master_addr, master_port)


# Where free_port looks first: above Ray's worker ports (10002-19999 by default), below Linux's usual
# ephemeral range (32768-60999), which /proc tells exactly where it can.
RENDEZVOUS_PORTS = range(20000, 32768)


def ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports (Linux's /proc; the usual one elsewhere)."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port free on this host right now, outside the ephemeral range where one is free. Why: the
    rendezvous binds it later (after a model load: minutes on a loaded machine), and meanwhile any outgoing
    connection may take an ephemeral port (seen once in CI: a learner re-form failed with EADDRINUSE).
    Picked at random from the OS's entropy: a seeded ``random`` would give concurrent runs the same port."""
    ephemeral, pick = ephemeral_ports(), random.SystemRandom()
    for port in pick.sample(RENDEZVOUS_PORTS, 32):
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken, or the range ephemeral here: any port the OS gives
        s.bind(("", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------


class LossForward(torch.nn.Module):
    """``forward(batch, fn)`` = ``fn(hidden (B, T, H) float32)`` with every parameter usable inside ``fn``.

    The root FSDP module: its forward unshards the parameters outside the per-layer groups (embeddings,
    LM head, norms, the vision merger), so the losses in ``fn`` may read ``model.lm_head.weight``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], fn: Callable[[torch.Tensor], Any],
                autocast: bool = False) -> Any:
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            hidden = self.model.model(**batch).last_hidden_state.float()  # (B, T, H); losses in fp32
        return fn(hidden)


def fully_shard_model(model: torch.nn.Module, mixed_precision: bool = False) -> LossForward:
    """FSDP2-shard a Qwen3-VL model in place: one group per vision block and decoder layer, one root.

    The sharded parameters (master weights, what AdamW updates) stay float32. ``mixed_precision``: each
    group's all-gather casts them to bf16 (half the bytes moved, bf16 compute without autocast's casts) and
    the gradients are reduce-scattered in float32 (a bf16 sum over ranks would round every rank's share);
    without it, gathers move float32 and bf16 compute comes from autocast, as on one rank. Gradient
    reductions are sums (see the module docstring).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    inner = model.model
    for block in inner.visual.blocks:
        fully_shard(block, mp_policy=policy)
    for layer in inner.language_model.layers:
        fully_shard(layer, mp_policy=policy)
    root = LossForward(model)
    fully_shard(root, mp_policy=policy)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return root


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer of the language model in place (learner.compile); returns how many.

    Per layer, as torchtitan does: the layers share one code object, so one compile serves all of them, and
    a graph break costs one layer, not the model. In place (the module's own compile method), so parameter
    names, and with them checkpoints and weight sync, do not change. dynamic=True: sequence lengths change
    every step, and without it each new length recompiles. Found by name, so a LoRA-wrapped model
    (learner/lora.py) is found too. FSDP2 shards the compiled layers afterwards; that combination is not
    tested here (CPU tests compile one unsharded rank).
    """
    layers = [m for name, m in model.named_modules() if name.endswith("language_model.layers")]
    if len(layers) != 1:
        raise ValueError(f"learner.compile: expected one language_model.layers list in the model, found {len(layers)}")
    for layer in layers[0]:
        layer.compile(dynamic=True)
    return len(layers[0])


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one; a collective on every rank for a DTensor."""
    return t.full_tensor() if is_sharded(t) else t
