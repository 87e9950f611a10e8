"""`coordexp-rl export`: a learner checkpoint (here one holding the taught weights, so that what it
predicts shows whose weights were loaded) as a model folder that both engines load; `infer --model
CHECKPOINT` exports on the fly; broken checkpoints and lost base models are refused by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

from coordexp_rl.cli import main
from coordexp_rl.config import load_config
from coordexp_rl.method.coords import bins_to_pixels
from coordexp_rl.modeling.load import load_model_and_processor
from learner.learner import Learner
from tests.inference.conftest import PROMPT, TAUGHT, read_jsonl, write_subset


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, taught_dir, tmp_path_factory) -> tuple[Path, dict]:
    """A checkpoint of a learner built on the random tiny model whose weights were then set to the taught
    ones: the base folder recorded in it knows nothing of the taught answer."""
    learner = Learner(load_config(None, []), tiny_model_dir)
    load_model(learner.model, str(taught_dir / "model.safetensors"))
    learner.step = 7
    path = learner.save(tmp_path_factory.mktemp("run") / "checkpoints" / "step-000007")
    return path, {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def taught_boxes(model: Path, engine: str, synth_dir: Path, tmp_path: Path) -> list[dict]:
    data = write_subset(synth_dir, tmp_path / f"gt-{engine}.jsonl", 2)
    out = tmp_path / f"preds-{engine}.jsonl"
    assert main(["infer", "--model", str(model), "--data", str(data), "--out", str(out), "--engine", engine,
                 "--image-root", str(synth_dir), "--prompt", PROMPT, "--max-new-tokens", "20"]) == 0
    return [(p["objects"], g["width"], g["height"]) for p, g in zip(read_jsonl(out), read_jsonl(data))]


def assert_taught(predictions: list) -> None:
    for objects, width, height in predictions:
        (obj,) = objects
        assert obj["desc"] == TAUGHT[0].desc
        assert obj["bbox_2d"] == pytest.approx(list(bins_to_pixels(TAUGHT[0].bins, width, height)))


def test_export_holds_the_checkpoints_weights_and_the_hf_engine_predicts_with_them(checkpoint, synth_dir,
                                                                                  tmp_path, capsys):
    path, weights = checkpoint
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    model, _, _ = load_model_and_processor(out)
    exported = model.state_dict()
    assert exported.keys() == weights.keys()
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert_taught(taught_boxes(out, "hf", synth_dir, tmp_path))
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2  # no --force: kept
    assert "--force" in capsys.readouterr().err


def test_infer_on_a_checkpoint_folder_with_vllm(checkpoint, synth_dir, tmp_path):
    assert_taught(taught_boxes(checkpoint[0], "vllm", synth_dir, tmp_path))


def test_broken_checkpoints_and_lost_bases_are_refused_by_name(checkpoint, tiny_model_dir, tmp_path, capsys):
    path, _ = checkpoint
    incomplete = shutil.copytree(path, tmp_path / "incomplete")
    (incomplete / "COMPLETE").unlink()
    moved = shutil.copytree(path, tmp_path / "moved")
    state = json.loads((moved / "state.json").read_text())
    (moved / "state.json").write_text(json.dumps({**state, "model_path": str(tmp_path / "gone")}))
    cases = [(incomplete, [], "incomplete checkpoint"), (tiny_model_dir, [], "a model folder already"),
             (moved, [], "gone: the base model recorded in .*state.json is not a model folder"),
             (moved, ["--base", str(tmp_path)], "--base is not a model folder")]
    for folder, extra, message in cases:
        assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "o"), *extra]) == 2
        assert re.search(message, capsys.readouterr().err), message
    torn = shutil.copytree(path, tmp_path / "torn")
    (torn / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:1000])
    assert main(["export", "--checkpoint", str(torn), "--out", str(tmp_path / "o")]) == 2
    assert "its weights do not load into the base model" in capsys.readouterr().err
    # --base repairs a moved base
    assert main(["export", "--checkpoint", str(moved), "--out", str(tmp_path / "o"), "--base",
                 str(tiny_model_dir)]) == 0
