"""Save and resume a Learner bit for bit: weights, optimizer, scheduler, counters, RNG, data position.

Two layouts, named in ``state.json`` (``"layout"``):

- ``full`` (a learner whose ranks hold the whole model: one rank, or replicated ranks): ``model.safetensors``
  (LoRA: ``adapter.safetensors``, the trained tensors only, learner/lora.py), ``optim.pt`` (optimizer +
  scheduler), ``rng.pt``, written by rank 0 alone.
- ``sharded`` (an FSDP learner): ``shards/``, a torch.distributed.checkpoint folder with the model and
  optimizer state by parameter name, each rank writing only its own shard (learner/sharded_files.py), plus
  ``scheduler.pt`` and one ``rng-<rank>.pt`` per rank. No rank ever holds the whole state.

Either layout loads into any learner: a sharded checkpoint of N ranks resumes on M ranks (each reads the
chunks its shard overlaps; one rank reads whole tensors), a full one into FSDP ranks through rank 0 alone
(it reads the files and sends each rank its shard). A rank finds its own ``rng-<rank>.pt``, else rank 0's.

Every checkpoint is written into a private temporary sibling and renamed, with the completion marker
``COMPLETE`` written last; readers ignore a folder without it: a kill at any moment of a save (even during
the rename of an older folder) never leaves something that looks finished. The folder must be on a
filesystem all learner ranks see.

No pickle: ``*.pt`` files hold only tensors and plain data (dicts, lists, numbers, strings) and are read
with ``torch.load(weights_only=True)``, the sharded folder's metadata with an unpickler that builds only
torch.distributed.checkpoint's own metadata classes; a checkpoint from someone else cannot run code, and
one that carries a pickled object is refused with ``CheckpointError``.
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
from learner import lora, sharded_files

if TYPE_CHECKING:
    from learner.learner import Learner

FORMAT_VERSION = 2  # 2: no pickle (RNG states as tensors), completion marker
MARKER = "COMPLETE"
SHARDS = "shards"  # the sharded layout's torch.distributed.checkpoint folder
LAYOUT_FILES = {"full": ("model.safetensors", "optim.pt", "rng.pt"),
                "sharded": (f"{SHARDS}/{sharded_files.METADATA}", "scheduler.pt", "rng-0.pt")}
log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint folder that must not or cannot be loaded (incomplete, damaged, foreign format, pickled
    objects): the user picks another, so it ends a command with its message (coordexp_rl.errors)."""

    kind = "checkpoint error"


def save_checkpoint(learner: "Learner", path: Path, data_state: dict) -> Path:
    """Write the learner's whole training state to ``path`` (a collective: every rank calls it)."""
    d = learner.dist
    sharded = learner.sharded is not None
    # Rank 0 names the private folder; a sharded save has every rank write into it.
    tmp = _temp_folder(path) if d.is_main else None
    if sharded:
        tmp = Path(d.broadcast(str(tmp)))
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        sharded_files.save({"model": get_model_state_dict(learner.model),
                            "optim": get_optimizer_state_dict(learner.model, learner.optimizer)},
                           tmp / SHARDS, d.cpu_group)
        torch.save(rng_state(), tmp / f"rng-{d.rank}.pt")
    d.barrier()  # every rank's files are in tmp
    if d.is_main:
        if sharded:
            torch.save({"scheduler": learner.scheduler.state_dict()}, tmp / "scheduler.pt")
        else:
            if learner.cfg.model.lora.rank:  # the trained tensors only: the frozen base is model_path
                save_file(lora.trainable_state(learner.model), str(tmp / lora.ADAPTER_FILE))
            else:
                save_model(learner.model, str(tmp / "model.safetensors"))  # handles tied embeddings
            torch.save({"optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict()},
                       tmp / "optim.pt")
            torch.save(rng_state(), tmp / "rng.pt")
        state = {"format": FORMAT_VERSION, "step": learner.step, "stage2_steps": learner.stage2_steps,
                 "version": learner.version, "data": data_state, "sharding": "fsdp" if sharded else "replicate",
                 "layout": "sharded" if sharded else "full", "world_size": d.world_size,
                 "model_path": learner.model_path,  # the base folder: config and tokenizer for `coordexp-rl export`
                 "lora": lora.checkpoint_record(learner.cfg.model)}  # None: a full fine-tune
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        _write_marker(tmp, learner.step)
        _replace(tmp, path)
    d.barrier()
    return path


def _temp_folder(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))


def _write_marker(folder: Path, step: int) -> None:
    """The marker goes last, after every other file has reached the disk."""
    for f in folder.iterdir():
        if f.is_dir():  # shards/: torch.distributed.checkpoint synced its own files
            continue
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


def _full_model_state(file: Path) -> dict[str, torch.Tensor]:
    """A full-layout weights file by parameter name, tied names included: ``save_model`` keeps one name
    per shared tensor and records each dropped name in the file's metadata (dropped -> kept)."""
    from safetensors import safe_open

    state = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        aliases = f.metadata() or {}
    state.update({dropped: state[kept] for dropped, kept in aliases.items() if kept in state})
    return state


def _by_name(optim: dict, learner: "Learner") -> dict:
    """An optimizer state dict keyed by parameter index (``optimizer.state_dict()``, what a one-rank learner
    saves) keyed by parameter name instead, as torch.distributed.checkpoint's state-dict functions want. The
    index is the position in the learner's trainable parameters, in ``named_parameters`` order on any learner."""
    if not optim or all(isinstance(k, str) for k in optim.get("state", {})):
        return optim  # already by name (or rank > 0's empty dict)
    names = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    return {"state": {names[i]: v for i, v in optim["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]}


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


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
    layout = state.get("layout", "full")  # checkpoints written before the sharded layout are full
    if layout not in LAYOUT_FILES:
        raise CheckpointError(f"{state_file}: unknown layout {layout!r} (this code reads {', '.join(LAYOUT_FILES)})")
    files = LAYOUT_FILES[layout]
    if state.get("lora"):  # the adapter instead of the whole model
        files = tuple(lora.ADAPTER_FILE if f == "model.safetensors" else f for f in files)
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, {', '.join(missing)} missing")
    return state


def load_checkpoint(learner: "Learner", path: Path) -> dict:
    """Restore ``learner`` in place from ``path`` (a collective on W ranks); returns the saved data state."""
    path = Path(path)
    state = read_state(path)
    mismatch = lora.record_mismatch(state.get("lora"), learner.cfg.model)
    if mismatch:
        raise CheckpointError(f"{path / 'state.json'}: {mismatch}")
    sharded = state.get("layout", "full") == "sharded"
    own = path / f"rng-{learner.dist.rank}.pt"
    rng = safe_load((own if own.is_file() else path / "rng-0.pt") if sharded else path / "rng.pt")
    try:
        scheduler = _load_sharded(learner, path) if sharded else _load_full(learner, path, bool(state.get("lora")))
    except (SafetensorError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        # a torn file, another model's weights, a foreign object in the sharded metadata
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its weights or optimizer state do not load into this model ({first})") from None
    learner.scheduler.load_state_dict(scheduler)
    set_rng_state(rng)
    learner.step, learner.stage2_steps, learner.version = state["step"], state["stage2_steps"], state["version"]
    return state["data"]


def _load_sharded(learner: "Learner", path: Path) -> dict:
    """Each rank reads the chunks of its own shard (whole tensors on a replicated rank); returns the
    scheduler state."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    scheduler = safe_load(path / "scheduler.pt")["scheduler"]  # checked before any change
    # Templates in this learner's own layout (an optimizer without state gets it from a zero step at lr 0).
    state = {"model": get_model_state_dict(learner.model),
             "optim": get_optimizer_state_dict(learner.model, learner.optimizer)}
    sharded_files.load(state, path / SHARDS, learner.dist.cpu_group)
    set_model_state_dict(learner.model, state["model"])
    set_optimizer_state_dict(learner.model, learner.optimizer, state["optim"])
    return scheduler


def _load_full(learner: "Learner", path: Path, adapter: bool = False) -> dict:
    """Whole files; an FSDP learner has rank 0 read them and send each rank its shard. ``adapter``: a LoRA
    checkpoint (replicated learners only: LoRA with FSDP is refused by the config). Returns the scheduler
    state."""
    d = learner.dist
    if learner.sharded is None:
        optim = safe_load(path / "optim.pt")  # checked before any change
        if adapter:
            lora.load_trainable_state(learner.model, load_file(str(path / lora.ADAPTER_FILE)))
        else:
            load_model(learner.model, str(path / "model.safetensors"))
        learner.optimizer.load_state_dict(optim["optimizer"])
        return optim["scheduler"]
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    optim = safe_load(path / "optim.pt") if d.is_main else {}
    model = _full_model_state(path / "model.safetensors") if d.is_main else {}
    options = _full_options(broadcast_from_rank0=True)
    set_model_state_dict(learner.model, model, options=options)
    set_optimizer_state_dict(learner.model, learner.optimizer, _by_name(optim.get("optimizer", {}), learner),
                             options=options)
    return d.broadcast(optim.get("scheduler"))
