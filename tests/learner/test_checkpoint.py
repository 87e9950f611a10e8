"""Checkpoints: no pickle (weights_only loads), RNG restore, completion marker, keep_last pruning."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from learner.checkpoint import MARKER, CheckpointError, complete_checkpoints, latest_checkpoint, prune_checkpoints
from learner.learner import Learner


class Payload:
    """A pickled object that would create a file when unpickled (what a malicious optim.pt could do)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.target),)


@pytest.fixture(scope="module")
def learner(tiny_model_dir, synth_dir):
    cfg = load_config(None, ["optim.warmup_steps=0", "optim.batch_size=2", "stage1.steps=4"])
    lrn = Learner(cfg, tiny_model_dir)
    lrn.stage1_step(load_samples(synth_dir / "train.jsonl")[:2])  # optimizer state exists now
    return lrn


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def test_optimizer_and_rng_files_load_with_weights_only(learner, tmp_path):
    path = learner.save(tmp_path / "ckpt", {"stream": {"epoch": 0, "index": 2, "seed": 0}})
    optim = torch.load(path / "optim.pt", weights_only=True)
    assert optim["optimizer"]["state"] and optim["scheduler"]["last_epoch"] == 1
    assert set(torch.load(path / "rng.pt", weights_only=True)) >= {"torch", "python", "numpy"}
    assert json.loads((path / MARKER).read_text()) == {"step": learner.step}


def test_rng_streams_continue_after_a_load(learner, tmp_path):
    path = learner.save(tmp_path / "ckpt")
    expected = _draws()  # what the saving process draws next
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # another process's state
    learner.load(path)
    assert _draws() == expected


def test_a_pickled_object_in_optim_pt_is_refused_before_it_runs(learner, tmp_path):
    path = learner.save(tmp_path / "ckpt")
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    ran = tmp_path / "code_ran"
    torch.save({"optimizer": Payload(str(ran)), "scheduler": {}}, path / "optim.pt")
    with torch.no_grad():
        next(learner.model.parameters()).add_(1.0)  # so we can tell whether the load touched the weights
    changed = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"optim\.pt: refused to load: it holds pickled Python objects"):
        learner.load(path)
    assert not ran.exists()
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, changed[k]), k  # nothing was loaded
    learner.model.load_state_dict(before)


@pytest.mark.parametrize("torn", ["model.safetensors", "optim.pt", "rng.pt"])
def test_a_torn_file_is_a_checkpoint_error_naming_the_folder(learner, tmp_path, torn):
    path = learner.save(tmp_path / "ckpt")
    data = (path / torn).read_bytes()
    (path / torn).write_bytes(data[: len(data) // 2])  # e.g. a copy cut short
    with pytest.raises(CheckpointError, match=f"{path}.*(damaged|do not load)"):
        learner.load(path)


def test_a_checkpoint_without_its_marker_is_skipped_and_refused(learner, tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    good = learner.save(folder / "step-000001")
    half = folder / "step-000002"
    shutil.copytree(good, half)
    state = json.loads((half / "state.json").read_text())
    (half / "state.json").write_text(json.dumps({**state, "step": 2}))
    (half / MARKER).unlink()  # killed after writing files, before the marker
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(folder) == good
    assert "skipping" in caplog.text and "step-000002" in caplog.text
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        learner.load(half)


def test_keep_last_removes_the_oldest_and_saving_over_a_folder_replaces_it(learner, tmp_path):
    folder = tmp_path / "checkpoints"
    start = learner.step
    for i in range(3):
        learner.step = start + i
        learner.save(folder / f"step-{start + i:06d}")
    learner.step = start
    learner.save(folder / f"step-{start:06d}")  # saved again over itself: still one folder, complete
    assert [p.name for p in complete_checkpoints(folder)] == [f"step-{start + i:06d}" for i in range(3)]
    removed = prune_checkpoints(folder, keep_last=2)
    assert [p.name for p in removed] == [f"step-{start:06d}"]
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{start + 1:06d}", f"step-{start + 2:06d}"]
    assert prune_checkpoints(folder, keep_last=0) == []
    learner.step = start + 3
    learner.save(folder / f"step-{start + 3:06d}")
    protected = folder / f"step-{start + 1:06d}"  # the best one: kept beyond keep_last
    assert prune_checkpoints(folder, keep_last=1, protect=[str(protected)]) == [folder / f"step-{start + 2:06d}"]
    assert sorted(p.name for p in folder.iterdir()) == [protected.name, f"step-{start + 3:06d}"]
