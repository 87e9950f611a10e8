"""COCO as it is laid out (train2017/, val2017/, annotations/): convert both splits, validate, load each
with its own image root as the launcher does, and score perfect predictions with --coco-ann."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp_rl.cli import main
from coordexp_rl.config import load_config
from coordexp_rl.data.coco_sample import make_coco_sample
from coordexp_rl.data.loader import DataError, load_samples
from coordexp_rl.driver.assets import prepare_assets
from tests.data._util import read_jsonl


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = make_coco_sample(tmp_path_factory.mktemp("coco") / "coco", n_train=10, n_val=9)
    for split in ("train2017", "val2017"):
        assert main(["convert", "coco", "--ann", str(root / "annotations" / f"instances_{split}.json"),
                     "--image-root", str(root / split), "--out", str(root / f"{split}.jsonl"),
                     "--crowd", "mark"]) == 0
        assert main(["validate", str(root / f"{split}.jsonl"), "--image-root", str(root / split)]) == 0
    return root


def test_layout_is_coco(coco: Path):
    ann = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    assert all("/" not in img["file_name"] for img in ann["images"])  # no split folder in file_name
    assert (coco / "val2017" / ann["images"][0]["file_name"]).is_file()
    assert sum(a["iscrowd"] for a in ann["annotations"]) == 1  # the 8th image's last object


def test_train_and_val_have_their_own_roots(coco: Path, tmp_path: Path):
    cfg = load_config(None, [f"data.train={coco / 'train2017.jsonl'}", f"data.val={coco / 'val2017.jsonl'}",
                             f"data.train_image_root={coco / 'train2017'}", f"data.val_image_root={coco / 'val2017'}",
                             f"model.path={tmp_path}"])
    (tmp_path / "config.json").write_text("{}")  # prepare_assets only checks the model folder exists
    assets = prepare_assets(cfg)
    train = load_samples(assets.train_path, assets.train_image_root)
    val = load_samples(assets.val_path, assets.val_image_root)
    assert (len(train), len(val)) == (10, 9)
    assert all(s.image_path.parent == (coco / "val2017").resolve() for s in val)
    # One shared data.image_root (the old single setting) cannot serve both splits of this layout:
    with pytest.raises(DataError, match="no such file"):
        load_samples(assets.val_path, coco / "train2017")


def test_data_image_root_still_serves_both_when_the_split_roots_are_unset(tmp_path: Path):
    cfg = load_config(None, ["data.image_root=/imgs", f"model.path={tmp_path}", "data.train=t.jsonl"])
    (tmp_path / "config.json").write_text("{}")
    assets = prepare_assets(cfg)
    assert assets.train_image_root == assets.val_image_root == assets.image_root == Path("/imgs")


def test_gt_as_predictions_scores_one_on_the_official_file(coco: Path, tmp_path: Path, capsys):
    preds = tmp_path / "preds.jsonl"
    lines = []
    for rec in read_jsonl(coco / "val2017.jsonl"):  # crowd regions are in the JSONL, marked: leave them out
        crowd = rec["metadata"]["iscrowd"]
        objects = [{**o, "score": 1.0} for o, c in zip(rec["objects"], crowd) if not c]
        lines.append({**rec, "objects": objects, "parse_status": "ok"})
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    capsys.readouterr()
    assert main(["eval", "--coco-ann", str(coco / "annotations" / "instances_val2017.json"), "--pred", str(preds),
                 "--score-modes", "constant"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["constant"]["AP"] == pytest.approx(1.0) and out["images_scored"] == 9


def test_every_command_of_the_coco_guide_parses():
    """docs/COCO.md's commands use flags that exist and a config that loads (the guide cannot drift)."""
    import argparse
    import importlib
    import re
    import shlex

    from coordexp_rl.cli import COMMANDS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "COCO.md").read_text()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", doc, flags=re.S)).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if line.startswith(("coordexp-rl ", "python -m coordexp_rl"))]
    assert len(commands) >= 7
    for argv in commands:
        if argv[0] == "python":
            assert argv[2] == "coordexp_rl.launch" and argv[3] == "--config"
            load_config(Path(__file__).resolve().parents[2] / argv[4], [a for a in argv[5:] if "=" in a])
            continue
        parser = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[argv[1]][0]).add_arguments(parser)
        parser.parse_args(argv[2:])  # exits (SystemExit) on an unknown flag
