"""No command overwrites a file it did not write: `--out` onto an existing file or a non-empty folder is
refused unless `--force`, and never onto the command's own input (issue 31's cases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp_rl import cli
from coordexp_rl.errors import OverwriteError, refuse_overwrite


def test_refuse_overwrite_rules(tmp_path: Path):
    refuse_overwrite(tmp_path / "new.jsonl", force=False)  # nothing there
    refuse_overwrite(tmp_path, force=False)  # an empty folder
    (tmp_path / "a.jsonl").write_text("x\n")
    with pytest.raises(OverwriteError, match="existing file; pass --force"):
        refuse_overwrite(tmp_path / "a.jsonl", force=False)
    with pytest.raises(OverwriteError, match="non-empty folder"):
        refuse_overwrite(tmp_path, force=False)
    refuse_overwrite(tmp_path / "a.jsonl", force=True)
    with pytest.raises(OverwriteError, match="is an input of this command"):
        refuse_overwrite(tmp_path / "a.jsonl", force=True, inputs=(tmp_path / "." / "a.jsonl",))


def test_synth_refuses_to_overwrite_a_set(tmp_path: Path, capsys):
    args = ["synth", "--out", str(tmp_path / "set"), "--train", "2", "--val", "1", "--size", "32"]
    assert cli.main(args) == 0
    before = (tmp_path / "set" / "train.jsonl").read_text()
    assert cli.main([*args, "--seed", "5"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "set" / "train.jsonl").read_text() == before
    assert cli.main([*args, "--seed", "5", "--force"]) == 0


def test_convert_never_writes_onto_its_annotation_file(tmp_path: Path, capsys):
    ann = tmp_path / "instances.json"
    text = json.dumps({"images": [], "annotations": [], "categories": []})
    ann.write_text(text)
    conv = ["convert", "coco", "--ann", str(ann), "--image-root", str(tmp_path)]
    assert cli.main([*conv, "--out", str(ann), "--force"]) == 2
    assert "is an input of this command" in capsys.readouterr().err and ann.read_text() == text
    out = tmp_path / "out.jsonl"
    out.write_text("mine\n")
    assert cli.main([*conv, "--out", str(out)]) == 2 and out.read_text() == "mine\n"
    assert cli.main([*conv, "--out", str(out), "--force"]) == 0


def test_make_tiny_model_refuses_a_folder_with_weights(tmp_path: Path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert cli.main(["make-tiny-model", "--out", str(tmp_path)]) == 2
    assert "non-empty folder" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"


def test_infer_refuses_its_data_file_as_out(tmp_path: Path, capsys):
    data = tmp_path / "val.jsonl"
    text = json.dumps({"images": ["a.png"], "objects": []}) + "\n"
    data.write_text(text)
    assert cli.main(["infer", "--model", str(tmp_path), "--data", str(data), "--out", str(data)]) != 0
    assert "is an input of this command" in capsys.readouterr().err and data.read_text() == text
