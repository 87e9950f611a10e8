"""Small helpers for the data tests: real PNG files and JSONL files written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_png(path: Path, width: int, height: int, colour=(10, 20, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), colour if mode == "RGB" else colour[0]).save(path, format="PNG")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item: a dict (dumped as JSON) or a str (written as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
