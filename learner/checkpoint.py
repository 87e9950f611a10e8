"""Save and resume a Learner bit for bit: weights, optimizer, scheduler, counters, RNG, data position.

A checkpoint folder holds ``model.safetensors``, ``optim.pt`` (optimizer + scheduler), ``rng.pt`` and
``state.json``. It is written to a temporary folder and renamed, so a crash never leaves half a checkpoint.

On W ranks rank 0 writes (every rank waits for it) and every rank reads, so the folder must be on a
filesystem all learner ranks see. Replicated ranks hold the whole model: the files are the one-rank ones.
An FSDP learner gathers full (unsharded) model and optimizer state to rank 0's CPU memory (a collective)
and saves the optimizer by parameter name; on load every rank reads the full files and keeps its shard.
``state.json`` says which (``"sharding"``), and loading refuses a mismatch.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

if TYPE_CHECKING:
    from learner.learner import Learner

FORMAT_VERSION = 1


def save_checkpoint(learner: "Learner", path: Path, data_state: dict) -> Path:
    sharded = learner.sharded is not None
    full = _full_state(learner) if sharded else None  # a collective: every rank takes part
    if not learner.dist.is_main:
        learner.dist.barrier()  # until rank 0 has written
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if full is not None:
        model_state, optim_state = full
        save_file({k: v.contiguous().clone() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    else:
        save_model(learner.model, str(tmp / "model.safetensors"))  # handles tied embeddings
        optim_state = learner.optimizer.state_dict()
    torch.save({"optimizer": optim_state, "scheduler": learner.scheduler.state_dict()}, tmp / "optim.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               tmp / "rng.pt")
    state = {"format": FORMAT_VERSION, "step": learner.step, "stage2_steps": learner.stage2_steps,
             "version": learner.version, "data": data_state, "sharding": "fsdp" if sharded else "replicate"}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    learner.dist.barrier()
    return path


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


def load_checkpoint(learner: "Learner", path: Path) -> dict:
    """Restore ``learner`` in place from ``path``; returns the saved data state."""
    state_file = path / "state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json)")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_file}: checkpoint format {state.get('format')}, this code reads {FORMAT_VERSION}")
    sharding = "fsdp" if learner.sharded is not None else "replicate"
    if state.get("sharding", "replicate") != sharding:
        raise ValueError(f"{state_file}: written by a {state.get('sharding')!r} learner, this one is {sharding!r}; "
                         f"resume with the same learner sharding")
    optim = torch.load(path / "optim.pt", weights_only=False)
    if learner.sharded is not None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(learner.model, load_file(str(path / "model.safetensors")), options=_state_dict_options())
        set_optimizer_state_dict(learner.model, learner.optimizer, optim["optimizer"], options=_state_dict_options())
    else:
        load_model(learner.model, str(path / "model.safetensors"))
        learner.optimizer.load_state_dict(optim["optimizer"])
    learner.scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    learner.step, learner.stage2_steps, learner.version = state["step"], state["stage2_steps"], state["version"]
    return state["data"]
