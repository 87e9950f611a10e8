"""Sending the learner's weights to the rollout engines: packed buckets and two transports.

Weight sync cost is dominated by per-tensor calls, not bytes (shared/LESSONS.md), so tensors travel in a
few packed buckets: each bucket is one contiguous 1-D buffer of one dtype plus a manifest that says where
each tensor lives in it. Two transports move the buckets (both pure torch; the Ray calls stay with the
caller):

- ``ObjectStoreTransport``: ``send`` returns a ``WeightPayload`` (version + buckets); the caller puts it in
  Ray's object store once and makes ONE control call per engine actor, which calls ``receive(payload)``.
- ``BroadcastTransport``: a dedicated torch.distributed process group (gloo on CPU, NCCL on GPU) that
  ``init_weight_group`` builds without touching the default group (vLLM may own that one). Rank 0 (the
  learner) broadcasts a header (version + manifests), then each bucket; receivers allocate and receive.

Every collective has a timeout. A failed sync raises ``WeightSyncError`` and returns nothing: receivers
collect every bucket before any tensor is handed out, so the caller keeps its old weights.

>>> buckets = pack_buckets([("w", torch.ones(2, 3)), ("b", torch.zeros(3))], bucket_bytes=1 << 20)
>>> [(name, tuple(t.shape)) for name, t in unpack_bucket(buckets[0])]
[('w', (2, 3)), ('b', (3,))]
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Iterable, Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20  # 256 MiB: a handful of buckets for a 2B model in bf16

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight sync failed (timeout, lost peer, bad header); the receiver's weights are unchanged."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in its bucket: ``buffer[offset:offset + numel].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    offset: int  # in elements of the bucket's dtype
    numel: int


@dataclass
class Bucket:
    dtype: str
    buffer: torch.Tensor  # (sum of numel,) contiguous, of ``dtype``
    manifest: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


@dataclass
class WeightPayload:
    """What the object-store transport ships: put it in the object store once, pass the ref to each engine."""

    version: int
    buckets: list[Bucket]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight manifest")
    return dtype


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Flatten tensors into per-dtype buckets of at most ``bucket_bytes`` (a bigger tensor gets its own).

    Input order is kept inside each dtype; buckets come out in the order they fill up, then the
    partly filled ones in order of first dtype seen. Tensors are copied (detached) into the buffers.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    open_: dict[torch.dtype, tuple[list[torch.Tensor], list[TensorSpec], int]] = {}
    done: list[Bucket] = []
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in the weights to send")
        seen.add(name)
        tensor = tensor.detach()
        parts, specs, used = open_.get(tensor.dtype, ([], [], 0))
        nbytes = tensor.numel() * tensor.element_size()
        if parts and used + nbytes > bucket_bytes:
            done.append(_close(tensor.dtype, parts, specs))
            parts, specs, used = [], [], 0
        offset = sum(s.numel for s in specs)
        specs.append(TensorSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype), offset, tensor.numel()))
        parts.append(tensor.reshape(-1))
        open_[tensor.dtype] = (parts, specs, used + nbytes)
    done += [_close(dtype, parts, specs) for dtype, (parts, specs, _) in open_.items() if specs]
    return done


def _close(dtype: torch.dtype, parts: list[torch.Tensor], specs: list[TensorSpec]) -> Bucket:
    return Bucket(dtype_name(dtype), torch.cat(parts).contiguous(), list(specs))


def unpack_bucket(bucket: Bucket) -> NamedTensors:
    """Bucket -> [(name, tensor)] in manifest order. The tensors are views of ``bucket.buffer``."""
    total = sum(s.numel for s in bucket.manifest)
    if bucket.buffer.dim() != 1 or bucket.buffer.numel() != total:
        raise WeightSyncError(f"bucket buffer has shape {tuple(bucket.buffer.shape)}, its manifest needs "
                              f"({total},)")
    if dtype_name(bucket.buffer.dtype) != bucket.dtype:
        raise WeightSyncError(f"bucket buffer is {bucket.buffer.dtype}, its manifest says {bucket.dtype}")
    return [(s.name, bucket.buffer[s.offset:s.offset + s.numel].view(s.shape)) for s in bucket.manifest]


def unpack_all(buckets: Iterable[Bucket]) -> NamedTensors:
    return [pair for bucket in buckets for pair in unpack_bucket(bucket)]


class WeightTransport(Protocol):
    """Learner side ``send``; engine side ``receive`` -> (version, [(name, tensor)]) or WeightSyncError."""

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightPayload | None:
        ...

    def receive(self, payload: WeightPayload | None = None) -> tuple[int, NamedTensors]:
        ...


class ObjectStoreTransport:
    """Buckets through Ray's object store: ``send`` packs, the caller ``ray.put``s, engines ``receive``.

    Buckets are packed where the tensors live (one ``cat`` per bucket on the GPU), then each bucket
    buffer moves to host memory, which is what the object store holds: one device-to-host copy per bucket.
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str | torch.device = "cpu"):
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)  # where receive() puts the tensors

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightPayload:
        buckets = pack_buckets(named_tensors, self.bucket_bytes)
        return WeightPayload(int(version), [Bucket(b.dtype, b.buffer.cpu(), b.manifest) for b in buckets])

    def receive(self, payload: WeightPayload | None = None) -> tuple[int, NamedTensors]:
        if not isinstance(payload, WeightPayload):
            raise WeightSyncError(f"object-store receive needs a WeightPayload, got {type(payload).__name__}")
        named = unpack_all(Bucket(b.dtype, b.buffer.to(self.device), b.manifest) for b in payload.buckets)
        return payload.version, named


@dataclass
class WeightGroup:
    """A dedicated process group for weights; rank 0 is the learner. Build it with ``init_weight_group``."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    timeout_s: float
    pg: object  # torch.distributed Backend (ProcessGroupGloo / ProcessGroupNCCL)
    store: object  # kept alive: the group's rendezvous store
    broken: str = ""  # why the group is unusable (a collective failed); empty when healthy

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        """Broadcast ``tensor`` from rank 0 in place; raise WeightSyncError after ``timeout_s``."""
        if self.broken:
            raise WeightSyncError(f"weight group is broken ({self.broken}); create a new one with "
                                  f"init_weight_group on a fresh port")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        timeout = timedelta(seconds=self.timeout_s)
        opts.timeout = timeout
        try:
            work = self.pg.broadcast([tensor], opts)
            if not work.wait(timeout):
                raise RuntimeError("wait returned False")
        except RuntimeError as exc:
            # A timed-out collective leaves the peers out of step: the group cannot be reused.
            self.broken = f"broadcast of {what} failed: {exc}"
            raise WeightSyncError(f"rank {self.rank}: broadcast of {what} failed within "
                                  f"{self.timeout_s:g} s ({exc}); weights unchanged") from exc


def init_weight_group(master_addr: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                      timeout_s: float = 60.0) -> WeightGroup:
    """Join a weight-sync group of ``world_size`` ranks (learner = rank 0, which hosts the TCP store).

    The group is stateless with respect to ``torch.distributed``'s default group: engines that already
    run their own (vLLM) can join. Raises WeightSyncError when the peers do not meet within ``timeout_s``.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight group backend must be 'gloo' or 'nccl', got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(master_addr, port, world_size, rank == 0, timeout=timeout,
                              wait_for_workers=False)
        prefixed = dist.PrefixStore("coordexp_weights", store)
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # On one machine bind loopback; otherwise let gloo resolve this host's interface.
            local = master_addr in ("127.0.0.1", "localhost")
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1") if local
                             else dist.ProcessGroupGloo.create_default_device()]
            pg, device = dist.ProcessGroupGloo(prefixed, rank, world_size, opts), torch.device("cpu")
        else:
            if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
                raise ValueError("backend 'nccl' needs a CUDA build of torch and a GPU; use 'gloo' on CPU")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            device = torch.device("cuda", torch.cuda.current_device())
    except (RuntimeError, dist.DistStoreError) as exc:
        raise WeightSyncError(f"rank {rank}/{world_size}: weight group at {master_addr}:{port} "
                              f"({backend}) did not form within {timeout_s:g} s: {exc}") from exc
    log.info("weight group ready: rank %d/%d %s at %s:%d", rank, world_size, backend, master_addr, port)
    return WeightGroup(rank, world_size, backend, device, timeout_s, pg, store)


class BroadcastTransport:
    """Buckets by broadcast over a ``WeightGroup``: rank 0 sends, every other rank receives."""

    def __init__(self, group: WeightGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.bucket_bytes = bucket_bytes

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.group.rank != 0:
            raise WeightSyncError(f"rank {self.group.rank} cannot send weights; only rank 0 (the learner)")
        buckets = pack_buckets(named_tensors, self.bucket_bytes)
        self.send_header(version, buckets)
        for i, bucket in enumerate(buckets):
            self.send_bucket(i, bucket)

    def send_header(self, version: int, buckets: list[Bucket]) -> None:
        """Broadcast the header's byte length, then the JSON header (version and manifests)."""
        header = {"version": int(version),
                  "buckets": [{"dtype": b.dtype, "manifest": [asdict(s) for s in b.manifest]} for b in buckets]}
        data = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        self.group.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.group.device),
                             "header length")
        self.group.broadcast(data.to(self.group.device), "header")

    def send_bucket(self, index: int, bucket: Bucket) -> None:
        self.group.broadcast(bucket.buffer.to(self.group.device), f"bucket {index}")

    def receive(self, payload: WeightPayload | None = None) -> tuple[int, NamedTensors]:
        """Receive one full sync; every bucket arrives before any tensor is returned."""
        if self.group.rank == 0:
            raise WeightSyncError("rank 0 is the sender; receive() runs on engine ranks")
        device = self.group.device
        length = torch.zeros(1, dtype=torch.int64, device=device)
        self.group.broadcast(length, "header length")
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        self.group.broadcast(data, "header")
        try:
            header = json.loads(bytes(data.cpu().numpy()).decode())
            buckets = [Bucket(b["dtype"], torch.empty(sum(s["numel"] for s in b["manifest"]),
                                                      dtype=dtype_from_name(b["dtype"]), device=device),
                              [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"], s["offset"], s["numel"])
                               for s in b["manifest"]]) for b in header["buckets"]]
        except (ValueError, KeyError, TypeError) as exc:
            self.group.broken = f"bad header: {exc}"
            raise WeightSyncError(f"weight header could not be read ({exc}); weights unchanged") from exc
        for i, bucket in enumerate(buckets):
            self.group.broadcast(bucket.buffer, f"bucket {i} of version {header['version']}")
        return int(header["version"]), unpack_all(buckets)
