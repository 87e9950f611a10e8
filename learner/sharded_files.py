"""Sharded checkpoint files: torch.distributed.checkpoint (DCP), read without pickle.

Every rank writes its own shard of a state dict (``__<rank>_0.distcp``; the coordinator adds ``.metadata``,
which says where each tensor's chunks live). A load asks for the tensors this process holds, whole or as its
DTensor shard, and DCP reads only the chunks they overlap: a checkpoint written by N ranks loads on M ranks,
or into whole tensors in one process (``read_tensors``: the export, tensor group by tensor group).

DCP itself pickles the metadata and the non-tensor items (the optimizer's param groups) and unpickles them
on load, which would let a checkpoint from someone else run code. Here the metadata goes through an
unpickler that knows only DCP's metadata classes, and the items through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

METADATA = ".metadata"

# What a DCP .metadata file may name: its own dataclasses and enums, torch sizes, dtypes and layouts, paths.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                    "torch.distributed.checkpoint.planner")
_ALLOWED = {("torch", "Size"), ("torch._utils", "_get_layout"), ("torch.serialization", "_get_layout"),
            ("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class ShardError(RuntimeError):
    """A sharded save or load that failed on some rank, with that rank's reason (DCP raises a
    BaseException that names only the ranks)."""


def _reason(exc: CheckpointException) -> ShardError:
    rank, failure = sorted(exc.failures.items())[0]
    err = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback) when wrapped
    return ShardError(f"rank {rank}: {str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")


class ForeignObject(pickle.UnpicklingError):
    """A metadata file naming a class outside DCP's own: refused before anything is built."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise ForeignObject(f"{module}.{name} is not a checkpoint metadata class")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata load builds DCP's metadata classes and nothing else."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise ForeignObject(f"{Path(self.path) / METADATA} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with ``weights_only=True`` (plain data only)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # what DefaultLoadPlanner does

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _call(fn, state: dict, **kwargs) -> None:
    """``fn`` (DCP's save or load) with a failure as a ShardError naming the first failed rank's reason.
    One process without a process group works alone; ranks coordinate over ``group`` (the learner's gloo
    group, so that NCCL never carries checkpoint control messages)."""
    group, alone = kwargs.pop("group", None), kwargs.pop("alone", False)
    alone = alone or not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # DCP warns at every single-process call, even when told no_dist
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        try:
            fn(state, **kwargs, **({"no_dist": True} if alone else {"process_group": group}))
        except CheckpointException as exc:
            raise _reason(exc) from None


def save(state: dict, folder: Path, group=None) -> None:
    """Every rank writes its part of ``state`` (tensors, DTensors, plain data) into ``folder`` (a collective)."""
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True)
    _call(dcp_save, state, storage_writer=writer, group=group)


def load(state: dict, folder: Path, group=None) -> None:
    """Fill ``state``'s tensors in place from ``folder`` (a collective); plain items are replaced."""
    _call(dcp_load, state, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(), group=group)


def tensor_specs(folder: Path, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (global shape, dtype) of the tensors under ``prefix`` in a sharded folder (metadata only)."""
    metadata = SafeReader(str(folder)).read_metadata()
    return {k[len(prefix):]: (tuple(md.size), md.properties.dtype)
            for k, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and k.startswith(prefix)}


def read_tensors(folder: Path, names: Iterable[str], prefix: str = "", group_bytes: int = 1 << 30):
    """Yield ``(name, whole tensor)`` for ``names`` (under ``prefix``), reading about ``group_bytes`` at a
    time in one process: only one group of whole tensors exists at once, whatever the checkpoint's size."""
    specs = tensor_specs(folder, prefix)
    batch: dict[str, torch.Tensor] = {}
    used = 0
    for name in names:
        shape, dtype = specs[name]
        batch[prefix + name] = torch.empty(shape, dtype=dtype)
        used += batch[prefix + name].numel() * dtype.itemsize
        if used >= group_bytes:
            yield from _load_batch(batch, folder, prefix)
            batch, used = {}, 0
    if batch:
        yield from _load_batch(batch, folder, prefix)


def _load_batch(batch: dict[str, torch.Tensor], folder: Path, prefix: str):
    _call(dcp_load, batch, storage_reader=SafeReader(str(folder)), planner=SafeLoadPlanner(flatten_state_dict=False),
          alone=True)
    for key, tensor in batch.items():
        yield key[len(prefix):], tensor
