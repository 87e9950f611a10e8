"""Save and resume a Learner bit for bit: weights, optimizer, scheduler, counters, RNG, data position.

A checkpoint folder holds ``model.safetensors`` (LoRA: ``adapter.safetensors``, the trained tensors only,
learner/lora.py), ``optim.pt`` (optimizer + scheduler), ``rng.pt``,
``state.json`` and, written last, the completion marker ``COMPLETE``. It is written into a private
temporary sibling and renamed, and readers ignore a folder without the marker: a kill at any moment of a
save (even during the rename of an older folder) never leaves something that looks finished.

No pickle: ``optim.pt`` and ``rng.pt`` hold only tensors and plain data (dicts, lists, numbers, strings)
and are read with ``torch.load(weights_only=True)``, so a checkpoint folder from someone else cannot run
code; one that carries a pickled object is refused with ``CheckpointError``.

On W ranks rank 0 writes (every rank waits for it) and every rank reads, so the folder must be on a
filesystem all learner ranks see. Replicated ranks hold the whole model: the files are the one-rank ones.
An FSDP learner gathers full (unsharded) model and optimizer state to rank 0's CPU memory (a collective)
and saves the optimizer by parameter name; on load every rank reads the full files and keeps its shard.
``state.json`` says which (``"sharding"``), and loading refuses a mismatch.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from coordexp_rl.errors import UserError
from learner import lora

if TYPE_CHECKING:
    from learner.learner import Learner

FORMAT_VERSION = 2  # 2: no pickle (RNG states as tensors), completion marker
MARKER = "COMPLETE"
log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint folder that must not or cannot be loaded (incomplete, damaged, foreign format, pickled
    objects): the user picks another, so it ends a command with its message (coordexp_rl.errors)."""

    kind = "checkpoint error"


def save_checkpoint(learner: "Learner", path: Path, data_state: dict) -> Path:
    sharded = learner.sharded is not None
    full = _full_state(learner) if sharded else None  # a collective: every rank takes part
    if not learner.dist.is_main:
        learner.dist.barrier()  # until rank 0 has written
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    if full is not None:
        model_state, optim_state = full
        save_file({k: v.contiguous().clone() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    elif learner.cfg.model.lora.rank:  # the trained tensors only: the frozen base is model_path
        save_file(lora.trainable_state(learner.model), str(tmp / lora.ADAPTER_FILE))
        optim_state = learner.optimizer.state_dict()
    else:
        save_model(learner.model, str(tmp / "model.safetensors"))  # handles tied embeddings
        optim_state = learner.optimizer.state_dict()
    torch.save({"optimizer": optim_state, "scheduler": learner.scheduler.state_dict()}, tmp / "optim.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    state = {"format": FORMAT_VERSION, "step": learner.step, "stage2_steps": learner.stage2_steps,
             "version": learner.version, "data": data_state, "sharding": "fsdp" if sharded else "replicate",
             "model_path": learner.model_path,  # the base folder: config and tokenizer for `coordexp-rl export`
             "lora": lora.checkpoint_record(learner.cfg.model)}  # None: a full fine-tune
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _write_marker(tmp, learner.step)
    _replace(tmp, path)
    learner.dist.barrier()
    return path


def _write_marker(folder: Path, step: int) -> None:
    """The marker goes last, after every other file has reached the disk."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    with open(folder / MARKER, "w") as fh:
        fh.write(json.dumps({"step": step}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _replace(tmp: Path, path: Path) -> None:
    """Put the finished ``tmp`` at ``path``; an older folder there is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    """Every RNG the learner process uses, as tensors and plain numbers (loads with weights_only=True)."""
    version, mt, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"key": key, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["key"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(file: Path):
    """``torch.load(weights_only=True)``: tensors and plain data only; anything else is refused."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file}: refused to load: it holds pickled Python objects, not only tensors and plain data "
            f"(torch.load weights_only=True said: {first}). Loading it could run code from whoever wrote "
            "it; use checkpoints written by this code (format "
            f"{FORMAT_VERSION}) from a source you trust.") from None
    except (RuntimeError, EOFError, OSError) as exc:  # a torn or overwritten file
        raise CheckpointError(f"{file}: damaged, cannot be loaded ({str(exc).strip().splitlines()[0]})") from None


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def checkpoint_step(path: Path) -> int:
    return int(json.loads((Path(path) / "state.json").read_text())["step"])


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest step first; incomplete ones are named in the log."""
    found = []
    for p in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if not p.is_dir():
            continue
        if not is_complete(p):
            log.warning("skipping %s: no %s marker (a save that did not finish, e.g. killed while saving)",
                        p, MARKER)
            continue
        found.append(p)
    return sorted(found, key=lambda p: (checkpoint_step(p), p.name))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (highest step), or None."""
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def prune_checkpoints(folder: Path, keep_last: int, protect=()) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete checkpoints (0 = keep all) and those in ``protect``
    (paths: the best one, those being scored); returns the deleted."""
    if keep_last <= 0:
        return []
    kept = {Path(p).resolve() for p in protect}
    old = [p for p in complete_checkpoints(folder)[:-keep_last] if p.resolve() not in kept]
    for p in old:
        shutil.rmtree(p)
        log.info("removed old checkpoint %s (run.keep_last=%d)", p, keep_last)
    return old


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _full_state(learner: "Learner") -> tuple[dict, dict]:
    """Whole model and optimizer state (by parameter name) of a sharded learner, on rank 0's CPU (a
    collective: every rank calls it; the others get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_dict_options(cpu_offload=True)
    return (get_model_state_dict(learner.model, options=opts),
            get_optimizer_state_dict(learner.model, learner.optimizer, options=opts))


def read_state(path: Path) -> dict:
    """A checkpoint folder's ``state.json``, after the checks that need no tensors: the folder, its files,
    the completion marker, the format. CheckpointError names what is wrong."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no state.json)")
    if not is_complete(path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker: its save did not finish); "
                              "resume from an earlier one, or use run.resume=auto to pick the newest complete one")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: damaged, cannot be read as JSON ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{state_file}: checkpoint format {found}, this code reads {FORMAT_VERSION}")
    weights = lora.ADAPTER_FILE if state.get("lora") else "model.safetensors"
    missing = [f for f in (weights, "optim.pt", "rng.pt") if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, {', '.join(missing)} missing")
    return state


def load_checkpoint(learner: "Learner", path: Path) -> dict:
    """Restore ``learner`` in place from ``path``; returns the saved data state."""
    state_file = path / "state.json"
    state = read_state(path)
    sharding = "fsdp" if learner.sharded is not None else "replicate"
    if state.get("sharding", "replicate") != sharding:
        raise CheckpointError(f"{state_file}: written by a {state.get('sharding')!r} learner, this one is "
                              f"{sharding!r}; resume with the same learner sharding")
    mismatch = lora.record_mismatch(state.get("lora"), learner.cfg.model)
    if mismatch:
        raise CheckpointError(f"{state_file}: {mismatch}")
    optim, rng = safe_load(path / "optim.pt"), safe_load(path / "rng.pt")  # both checked before any change
    try:
        if learner.sharded is not None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            set_model_state_dict(learner.model, load_file(str(path / "model.safetensors")),
                                 options=_state_dict_options())
            set_optimizer_state_dict(learner.model, learner.optimizer, optim["optimizer"],
                                     options=_state_dict_options())
        elif state.get("lora"):
            lora.load_trainable_state(learner.model, load_file(str(path / lora.ADAPTER_FILE)))
            learner.optimizer.load_state_dict(optim["optimizer"])
        else:
            load_model(learner.model, str(path / "model.safetensors"))
            learner.optimizer.load_state_dict(optim["optimizer"])
    except (SafetensorError, RuntimeError, KeyError, ValueError) as exc:  # torn file, another model's weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its weights or optimizer state do not load into this model ({first})") from None
    learner.scheduler.load_state_dict(optim["scheduler"])
    set_rng_state(rng)
    learner.step, learner.stage2_steps, learner.version = state["step"], state["stage2_steps"], state["version"]
    return state["data"]
