"""Sending the learner's weights to the rollout engines: streamed buckets and two transports.

Weight sync cost is dominated by per-tensor calls, not bytes (open-instruct: >120 s to 0.5 s), so tensors travel in
buckets: each bucket is a run of consecutive tensors of one dtype with a manifest that says where each
tensor lives in the bucket's flat buffer. Buckets are STREAMED: ``iter_buckets`` fills one bucket, the
transport ships it, the next one reuses nothing of it, so the sender holds about one bucket of extra
memory however big the model (on a GPU: one bucket on the device, then one device-to-host copy).
Tensors are cast to the engine's dtype while they are packed (bf16 engines get half the bytes).
Two transports move the buckets (both pure torch; the Ray calls stay with the caller), with one pair of
methods: the learner's ``send(version, named_tensors, dtype=, omitted=)``, the engine's ``receive`` ->
(version, [(name, tensor)], omitted names):

- ``ObjectStoreTransport``: ``send(..., put=ray.put)`` puts each bucket in Ray's object store as soon as
  it is full and returns a ``WeightPayload`` (version + bucket refs); the caller puts the payload once and
  makes ONE control call per engine actor, which calls ``receive(payload, get=ray.get)``. A bucket
  pickles as numpy views of its tensors, which Ray writes straight into shared memory (pickle protocol
  5, out of band) and hands back zero-copy: one copy into the store, none out of it.
- ``BroadcastTransport``: a dedicated torch.distributed process group (gloo on CPU, NCCL on GPU) that
  ``init_weight_group`` builds without touching the default group (vLLM may own that one). Rank 0 (the
  learner) broadcasts each bucket (a JSON header, then the flat buffer), then an end header.

A payload may leave out tensors on purpose (``omitted``: frozen parameters the engine already holds);
engines accept an omission only when it is declared. Every collective has a timeout. A failed sync raises
``WeightSyncError`` and returns nothing: receivers collect every bucket before any tensor is handed out,
so the caller keeps its old weights.

>>> buckets = pack_buckets([("w", torch.ones(2, 3)), ("b", torch.zeros(3))], bucket_bytes=1 << 20)
>>> [(name, tuple(t.shape)) for name, t in unpack_bucket(buckets[0])]
[('w', (2, 3)), ('b', (3,))]
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from coordexp_rl.rollout.rendezvous import tcp_store

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20  # 256 MiB: a handful of buckets for a 2B model in bf16

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A weight sync failed (timeout, lost peer, bad header); the receiver's weights are unchanged."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in its bucket: ``flat[offset:offset + numel].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    offset: int  # in elements of the bucket's dtype
    numel: int


@dataclass
class Bucket:
    """Consecutive tensors of one dtype: ``tensors[i]`` is ``manifest[i]`` (contiguous, on the CPU once
    shipped). The tensors are views of one packed buffer, or the sender's own tensors when they needed no
    cast and no device copy (then nothing is copied until the object store writes them)."""

    dtype: str
    manifest: list[TensorSpec]
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(s.numel for s in self.manifest) * dtype_from_name(self.dtype).itemsize

    def flat(self) -> torch.Tensor:
        """The bucket as one 1-D buffer (what a broadcast sends)."""
        if not self.tensors:
            return torch.empty(0, dtype=dtype_from_name(self.dtype))
        return torch.cat([t.reshape(-1) for t in self.tensors])

    def __reduce__(self):
        # numpy byte views pickle out of band (protocol 5): Ray copies them once into shared memory and
        # the receiver gets views of it; a torch tensor would be copied into the pickle stream instead.
        views = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() for t in self.tensors]
        return _rebuild_bucket, (self.dtype, [asdict(s) for s in self.manifest], views)


def _rebuild_bucket(dtype: str, manifest: list[dict], views: list[np.ndarray]) -> Bucket:
    specs = [_spec(s) for s in manifest]
    with warnings.catch_warnings():  # shared-memory views are read-only; engines only read them
        warnings.simplefilter("ignore", UserWarning)
        tensors = [torch.from_numpy(v).view(dtype_from_name(dtype)).view(s.shape) for v, s in zip(views, specs)]
    return Bucket(dtype, specs, tensors)


def _spec(s: dict) -> TensorSpec:
    return TensorSpec(s["name"], tuple(s["shape"]), s["dtype"], s["offset"], s["numel"])


@dataclass
class WeightPayload:
    """What the object-store transport ships: the version, its buckets (or object refs to them, one per
    bucket) and the names left out on purpose (frozen tensors the engines already hold)."""

    version: int
    buckets: list
    omitted: tuple[str, ...] = ()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"unknown dtype {name!r} in a weight manifest")
    return dtype


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: str | torch.dtype | None = None) -> Iterator[Bucket]:
    """Consecutive tensors -> buckets of at most ``bucket_bytes`` (a bigger tensor gets its own), one at a
    time: the caller ships each before the next is built. A dtype change closes the bucket.

    ``dtype``: cast floating-point tensors to it (the engine's dtype); None keeps each tensor's own.
    Every bucket comes out on the CPU.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    target = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    run: list[tuple[str, torch.Tensor]] = []
    used, seen = 0, set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice in the weights to send")
        seen.add(name)
        tensor = tensor.detach()
        out_dtype = target if target is not None and tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * out_dtype.itemsize
        if run and (used + nbytes > bucket_bytes or out_dtype != _out_dtype(run[0][1], target)):
            yield _pack(run, target)
            run, used = [], 0
        run.append((name, tensor))
        used += nbytes
    if run:
        yield _pack(run, target)


def _out_dtype(tensor: torch.Tensor, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and tensor.is_floating_point() else tensor.dtype


def _pack(run: list[tuple[str, torch.Tensor]], target: torch.dtype | None) -> Bucket:
    dtype = _out_dtype(run[0][1], target)
    specs, offset = [], 0
    for name, t in run:
        specs.append(TensorSpec(name, tuple(t.shape), dtype_name(dtype), offset, t.numel()))
        offset += t.numel()
    if all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for _, t in run):
        return Bucket(dtype_name(dtype), specs, [t for _, t in run])  # nothing to copy yet
    # One buffer where the tensors live (the cast happens in copy_), then one copy to host memory.
    flat = torch.empty(offset, dtype=dtype, device=run[0][1].device)
    for s, (_, t) in zip(specs, run):
        flat[s.offset:s.offset + s.numel].copy_(t.reshape(-1))
    flat = flat.cpu()
    return Bucket(dtype_name(dtype), specs, [flat[s.offset:s.offset + s.numel].view(s.shape) for s in specs])


def ship_each(buckets: Iterator[Bucket], ship: Callable[[int, Bucket], object]) -> list:
    """``[ship(i, bucket) for i, bucket in enumerate(buckets)]``, but each bucket is let go before the next
    is packed: a loop variable (or enumerate's reused tuple) would keep bucket k alive while the generator
    packs k + 1, so the sender would hold two buckets."""
    shipped = []
    for bucket in buckets:
        shipped.append(ship(len(shipped), bucket))
        del bucket
    return shipped


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: str | torch.dtype | None = None) -> list[Bucket]:
    """All of ``iter_buckets`` at once (small models and tests)."""
    return list(iter_buckets(named_tensors, bucket_bytes, dtype))


def unpack_bucket(bucket: Bucket) -> NamedTensors:
    """Bucket -> [(name, tensor)] in manifest order, checked against the manifest."""
    if len(bucket.tensors) != len(bucket.manifest):
        raise WeightSyncError(f"bucket has {len(bucket.tensors)} tensors, its manifest {len(bucket.manifest)}")
    for s, t in zip(bucket.manifest, bucket.tensors):
        if tuple(t.shape) != s.shape or dtype_name(t.dtype) != bucket.dtype:
            raise WeightSyncError(f"{s.name}: got {dtype_name(t.dtype)} {tuple(t.shape)}, its manifest says "
                                  f"{bucket.dtype} {s.shape}")
    return [(s.name, t) for s, t in zip(bucket.manifest, bucket.tensors)]


def unpack_all(buckets: Iterable[Bucket]) -> NamedTensors:
    return [pair for bucket in buckets for pair in unpack_bucket(bucket)]


class ObjectStoreTransport:
    """Buckets through Ray's object store: ``send`` packs and ``put``s bucket by bucket, engines ``receive``.

    ``put``/``get`` are ``ray.put``/``ray.get`` in Ray processes; the identity (default) keeps the buckets
    themselves in the payload (tests, one process).
    """

    def __init__(self, bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: str | torch.device = "cpu"):
        self.bucket_bytes = bucket_bytes
        self.device = torch.device(device)  # where receive() puts the tensors

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
             dtype: str | torch.dtype | None = None, omitted: Iterable[str] = (),
             put: Callable[[Bucket], object] = lambda b: b) -> WeightPayload:
        buckets = ship_each(iter_buckets(named_tensors, self.bucket_bytes, dtype), lambda _, b: put(b))
        return WeightPayload(int(version), buckets, tuple(omitted))

    def receive(self, payload: WeightPayload | None = None,
                get: Callable[[list], list] = lambda refs: refs) -> tuple[int, NamedTensors, tuple[str, ...]]:
        if not isinstance(payload, WeightPayload):
            raise WeightSyncError(f"object-store receive needs a WeightPayload, got {type(payload).__name__}")
        named = unpack_all(get(list(payload.buckets)))
        if self.device.type != "cpu":
            named = [(n, t.to(self.device)) for n, t in named]
        return payload.version, named, tuple(payload.omitted)


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
        store = tcp_store(master_addr, port, world_size, rank, timeout)
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
    except (RuntimeError, OSError, dist.DistStoreError) as exc:
        raise WeightSyncError(f"rank {rank}/{world_size}: weight group at {master_addr}:{port} "
                              f"({backend}) did not form within {timeout_s:g} s: {exc}") from exc
    log.info("weight group ready: rank %d/%d %s at %s:%d", rank, world_size, backend, master_addr, port)
    return WeightGroup(rank, world_size, backend, device, timeout_s, pg, store)


class BroadcastTransport:
    """Buckets by broadcast over a ``WeightGroup``: rank 0 sends, every other rank receives.

    On the wire, per bucket: header length, JSON header (version, dtype, manifest), the flat buffer; then
    an end header (version, omitted names) with no buffer. Only one bucket exists at a time on rank 0.

    A receiver holds one bucket on the group's device (the engine's GPU under NCCL): every bucket arrives
    in one reused wire buffer and is copied to host memory before the next; the whole sync is staged on the
    host (the engine loads it from there), so that a failed sync hands out nothing. Staging on the engine's
    GPU instead would need a whole model's bytes next to vLLM's share (+17.5 GB for 8B in bf16).
    """

    def __init__(self, group: WeightGroup, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.wire: torch.Tensor | None = None  # the receiver's one buffer on the group's device, while receiving
        self.peak_device_bytes = 0  # the largest wire buffer a receive held (what it used on the device)

    def send(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
             dtype: str | torch.dtype | None = None, omitted: Iterable[str] = ()) -> None:
        if self.group.rank != 0:
            raise WeightSyncError(f"rank {self.group.rank} cannot send weights; only rank 0 (the learner)")
        ship_each(iter_buckets(named_tensors, self.bucket_bytes, dtype),
                  lambda i, bucket: self.send_bucket(version, i, bucket))
        self.send_header({"version": int(version), "end": True, "omitted": list(omitted)}, "end header")

    def send_header(self, header: dict, what: str) -> None:
        data = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        self.group.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.group.device),
                             f"{what} length")
        self.group.broadcast(data.to(self.group.device), what)

    def send_bucket(self, version: int, index: int, bucket: Bucket) -> None:
        self.send_header({"version": int(version), "dtype": bucket.dtype,
                          "manifest": [asdict(s) for s in bucket.manifest]}, f"bucket {index} header")
        self.group.broadcast(bucket.flat().to(self.group.device), f"bucket {index}")

    def _receive_header(self, what: str) -> dict:
        device = self.group.device
        length = torch.zeros(1, dtype=torch.int64, device=device)
        self.group.broadcast(length, f"{what} length")
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        self.group.broadcast(data, what)
        try:
            return json.loads(bytes(data.cpu().numpy()).decode())
        except ValueError as exc:
            self.group.broken = f"bad header: {exc}"
            raise WeightSyncError(f"weight header could not be read ({exc}); weights unchanged") from exc

    def receive(self, payload: WeightPayload | None = None) -> tuple[int, NamedTensors, tuple[str, ...]]:
        """Receive one full sync; every bucket arrives before any tensor is returned."""
        if self.group.rank == 0:
            raise WeightSyncError("rank 0 is the sender; receive() runs on engine ranks")
        try:
            return self._receive_buckets()
        finally:
            self.wire = None  # nothing of the sync stays on the device

    def _receive_buckets(self) -> tuple[int, NamedTensors, tuple[str, ...]]:
        buckets: list[Bucket] = []
        while True:
            header = self._receive_header(f"bucket {len(buckets)} header")
            if header.get("end"):
                return int(header["version"]), unpack_all(buckets), tuple(header.get("omitted", ()))
            try:
                specs = [_spec(s) for s in header["manifest"]]
                dtype = dtype_from_name(header["dtype"])
            except (KeyError, TypeError) as exc:
                self.group.broken = f"bad header: {exc}"
                raise WeightSyncError(f"weight header could not be read ({exc}); weights unchanged") from exc
            numel = sum(s.numel for s in specs)
            flat = self._wire(numel, dtype)
            self.group.broadcast(flat, f"bucket {len(buckets)} of version {header['version']}")
            host = torch.empty(numel, dtype=dtype, pin_memory=flat.is_cuda)
            host.copy_(flat)
            buckets.append(Bucket(header["dtype"], specs,
                                  [host[s.offset:s.offset + s.numel].view(s.shape) for s in specs]))

    def _wire(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``numel``-element view of the one wire buffer, grown (the old one let go first) when too small."""
        nbytes = numel * dtype.itemsize
        if self.wire is None or self.wire.numel() < nbytes:
            self.wire = None
            self.wire = torch.empty(nbytes, dtype=torch.uint8, device=self.group.device)
            self.peak_device_bytes = max(self.peak_device_bytes, nbytes)
        return self.wire[:nbytes].view(dtype)
