"""Save and resume a Learner bit for bit: weights, optimizer, scheduler, counters, RNG, data position.

A checkpoint folder holds ``model.safetensors``, ``optim.pt`` (optimizer + scheduler), ``rng.pt`` and
``state.json``. It is written to a temporary folder and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_model, save_model

if TYPE_CHECKING:
    from learner.learner import Learner

FORMAT_VERSION = 1


def save_checkpoint(learner: "Learner", path: Path, data_state: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(learner.model, str(tmp / "model.safetensors"))  # handles tied embeddings
    torch.save({"optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict()},
               tmp / "optim.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               tmp / "rng.pt")
    state = {"format": FORMAT_VERSION, "step": learner.step, "stage2_steps": learner.stage2_steps,
             "version": learner.version, "data": data_state}
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_checkpoint(learner: "Learner", path: Path) -> dict:
    """Restore ``learner`` in place from ``path``; returns the saved data state."""
    state_file = path / "state.json"
    if not state_file.exists():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no state.json)")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_file}: checkpoint format {state.get('format')}, this code reads {FORMAT_VERSION}")
    load_model(learner.model, str(path / "model.safetensors"))
    optim = torch.load(path / "optim.pt", weights_only=False)
    learner.optimizer.load_state_dict(optim["optimizer"])
    learner.scheduler.load_state_dict(optim["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    learner.step, learner.stage2_steps, learner.version = state["step"], state["stage2_steps"], state["version"]
    return state["data"]
