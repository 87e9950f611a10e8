"""Image paths stay inside the image root after symlinks resolve; BOM / CRLF files read like any other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp_rl.data.loader import DataError, load_samples
from coordexp_rl.data.paths import ImagePathError, resolve_image_path
from coordexp_rl.data.validate import validate_file
from coordexp_rl.evaluation.records import load_jsonl
from tests.data._util import write_png

REC = {"images": ["img/a.png"], "width": 8, "height": 6, "objects": [{"desc": "cat", "bbox_2d": [0, 0, 4, 3]}]}


@pytest.fixture()
def escaping_root(tmp_path: Path) -> Path:
    """root/img/a.png is a symlink to a real PNG outside the root; root/img/b.png a plain file."""
    outside = write_png(tmp_path / "secret" / "a.png", 8, 6)
    root = tmp_path / "root"
    write_png(root / "img" / "b.png", 8, 6)
    (root / "img" / "a.png").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "img" / "b.png")  # a symlink that stays inside is fine
    return root


def test_symlink_out_of_root_is_refused_by_resolve(escaping_root: Path):
    with pytest.raises(ImagePathError, match="outside the image root"):
        resolve_image_path(escaping_root, "img/a.png")
    assert resolve_image_path(escaping_root, "inner.png") == (escaping_root / "img" / "b.png").resolve()


@pytest.mark.parametrize("check_images", [True, False])
def test_symlink_out_of_root_fails_validate_and_training_load(escaping_root: Path, check_images: bool):
    data = escaping_root / "d.jsonl"
    data.write_text(json.dumps(REC) + "\n" + json.dumps({**REC, "images": ["inner.png"]}) + "\n")
    problems = validate_file(data, escaping_root, check_images=check_images)
    assert [(p.line, p.field) for p in problems] == [(1, "images[0]")]
    assert "outside the image root" in problems[0].message
    with pytest.raises(DataError, match=r"d.jsonl:1: images\[0\]: .*outside the image root"):
        load_samples(data, escaping_root, check_images=check_images)


def test_symlinked_root_itself_is_fine(tmp_path: Path):
    """The root may be a symlink (e.g. a mounted data folder): both sides are resolved."""
    write_png(tmp_path / "real" / "img" / "a.png", 8, 6)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(REC) + "\n")
    [s] = load_samples(data, tmp_path / "link")
    assert s.image_path == (tmp_path / "real" / "img" / "a.png")


@pytest.mark.parametrize("encoding,newline", [("utf-8-sig", "\n"), ("utf-8", "\r\n"), ("utf-8-sig", "\r\n")])
def test_bom_and_crlf_read_like_any_other(tmp_path: Path, encoding: str, newline: str):
    write_png(tmp_path / "img" / "a.png", 8, 6)
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({**REC, "metadata": {"id": f"s{i}"}}) for i in range(3)]
    data.write_bytes(newline.join(lines + [""]).encode(encoding))
    assert validate_file(data) == []  # validate
    assert [s.sample_id for s in load_samples(data)] == ["s0", "s1", "s2"]  # training / inference
    assert [r["metadata"]["id"] for r in load_jsonl(data)] == ["s0", "s1", "s2"]  # evaluation
