"""Check a JSONL file against the data contract: `coordexp-rl validate FILE.jsonl [--image-root DIR]`.

Prints every problem as ``FILE:LINE: field: message`` and exits 1 if there is any (0 and a one-line
summary when the file is clean). The loader runs the same checks before training starts.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pydantic import ValidationError

from coordexp_rl.data.contract import PIXEL, TOKEN, Record, record_problems
from coordexp_rl.data.paths import ImagePathError, path_escape_reason, resolve_image_path

__all__ = ["CheckedFile", "Problem", "check_file", "path_escape_reason", "read_lines", "validate_file"]

_OBJECT_KEYS = "desc, bbox_2d, poly"
_RECORD_KEYS = "images, width, height, objects, summary, metadata"


@dataclass(frozen=True)
class Problem:
    """One problem at a line of a file (line 0: the file as a whole)."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


@dataclass
class CheckedFile:
    """What ``check_file`` found: the records that passed (with their 1-based line) and all problems."""

    records: list[tuple[int, Record]]
    problems: list[Problem]
    image_paths: dict[str, Path] = field(default_factory=dict)  # images[0] as written -> resolved path


def validate_file(path: str | Path, image_root: str | Path | None = None, check_images: bool = True,
                  skip_bbox_norm: bool | None = None) -> list[Problem]:
    """All problems of a JSONL file (empty list: valid). See ``check_file`` for the arguments."""
    return check_file(path, image_root, check_images, skip_bbox_norm).problems


def check_file(path: str | Path, image_root: str | Path | None = None, check_images: bool = True,
               skip_bbox_norm: bool | None = None) -> CheckedFile:
    """Parse and check every line of ``path``.

    image_root: folder the image paths are relative to (default: the JSONL's folder).
    skip_bbox_norm: True = every record must be pre-tokenised (coord tokens); False = every record
        must use pixels; None = either, but one kind for the whole file.
    Blank lines are skipped; a file without records is a problem. Image paths are always checked to
    stay inside the root (symlinks resolved); ``check_images`` adds: the file exists, opens, has the size.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    name = str(path)
    problems: list[Problem] = []
    records: list[tuple[int, Record]] = []
    images = _ImageChecker(root, check_images)
    first_kind: tuple[int, str] | None = None  # (line, kind) of the first record that has objects
    seen_ids: dict[str, int] = {}
    try:
        lines = read_lines(path)
    except (OSError, UnicodeDecodeError) as exc:
        return CheckedFile([], [Problem(name, 0, "file", f"cannot be read as UTF-8 text: {exc}")])
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        found: list[tuple[str, str]] = []
        record = _parse_line(line, found)
        if record is not None:
            found += record_problems(record)
            found += _kind_problems(record, lineno, skip_bbox_norm, first_kind)
            if first_kind is None and record.kind is not None:
                first_kind = (lineno, record.kind)
            found += _id_problems(record, lineno, seen_ids)
            found += images.check(record)
        problems += [Problem(name, lineno, f, m) for f, m in found]
        if record is not None and not found:
            records.append((lineno, record))
    if not records and not problems:
        problems.append(Problem(name, 0, "file", "holds no records"))
    return CheckedFile(records, problems, images.paths)


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file as every reader of the project sees them.

    A UTF-8 byte-order mark (what Windows editors write first) is dropped and CRLF / CR line ends
    count as line ends, so such a file reads like any other.
    """
    return Path(path).read_text(encoding="utf-8-sig").splitlines()


def _parse_line(line: str, found: list[tuple[str, str]]) -> Record | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        found.append(("json", f"malformed JSON: {exc.msg} at column {exc.colno}"))
        return None
    if not isinstance(raw, dict):
        found.append(("json", f"a line must be a JSON object, got {type(raw).__name__}"))
        return None
    try:
        return Record.model_validate(raw)
    except ValidationError as exc:
        found += [(_field_path(err["loc"]), _message(err)) for err in exc.errors()]
        return None


def _field_path(loc: tuple) -> str:
    """``('objects', 2, 'bbox_2d')`` -> ``objects[2].bbox_2d``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "record"


def _message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        allowed = _OBJECT_KEYS if len(err["loc"]) > 1 else _RECORD_KEYS
        return f"unknown key (allowed: {allowed}; put anything else under 'metadata')"
    if err["type"] == "missing":
        return "required key is missing"
    return err["msg"]


def _kind_problems(record: Record, lineno: int, skip_bbox_norm: bool | None,
                   first_kind: tuple[int, str] | None) -> list[tuple[str, str]]:
    kind = record.kind
    if kind is None:
        return []
    field = f"objects[0].{record.objects[0].geometry_field}"
    if skip_bbox_norm is True and kind == PIXEL:
        return [(field, "pixel coordinates, but skip_bbox_norm is true (data.skip_bbox_norm) "
                        "which expects pre-tokenised '<|coord_k|>' values; set it to false for pixel data")]
    if skip_bbox_norm is False and kind == TOKEN:
        return [(field, "pre-tokenised '<|coord_k|>' values must not be normalised again; set "
                        "data.skip_bbox_norm: true")]
    if skip_bbox_norm is None and first_kind is not None and first_kind[1] != kind:
        return [(field, f"{kind} coordinates, but line {first_kind[0]} uses {first_kind[1]}; "
                        "a file holds one kind")]
    return []


def _id_problems(record: Record, lineno: int, seen: dict[str, int]) -> list[tuple[str, str]]:
    if not record.metadata or "id" not in record.metadata:
        return []
    sid = str(record.metadata["id"])
    if sid in seen:
        return [("metadata.id", f"{sid!r} repeats the id of line {seen[sid]}; sample ids must be unique")]
    seen[sid] = lineno
    return []


class _ImageChecker:
    """Image path checks (always) and file checks (``check_files``), each image looked at once."""

    def __init__(self, root: Path, check_files: bool):
        self.root, self.check_files = root, check_files
        self._resolved_root = root.resolve()
        self.paths: dict[str, Path] = {}  # rel -> resolved path (paths that passed)
        self._bad: dict[str, str] = {}  # rel -> why its path was refused
        self._sizes: dict[str, tuple[int, int] | str] = {}  # rel -> (w, h) or an error message

    def check(self, record: Record) -> list[tuple[str, str]]:
        rel = record.image
        if rel not in self.paths and rel not in self._bad:
            try:
                self.paths[rel] = resolve_image_path(self.root, rel, self._resolved_root)
            except ImagePathError as exc:
                self._bad[rel] = str(exc)
        if rel in self._bad:
            return [("images[0]", self._bad[rel])]
        if not self.check_files:
            return []
        if rel not in self._sizes:
            self._sizes[rel] = _open_size(self.paths[rel])
        size = self._sizes[rel]
        if isinstance(size, str):
            return [("images[0]", f"{rel!r} under {str(self.root)!r}: {size}")]
        w, h = size
        found = []
        if record.width != w:
            found.append(("width", f"is {record.width} but {rel!r} is {w}x{h} pixels"))
        if record.height != h:
            found.append(("height", f"is {record.height} but {rel!r} is {w}x{h} pixels"))
        return found


# Qwen3-VL's image processor refuses an absolute aspect ratio of 200 or more (smart_resize); found here, such
# an image would otherwise stop training or `infer` when an engine first meets it.
MAX_ASPECT_RATIO = 200


def _open_size(path: Path) -> tuple[int, int] | str:
    if not path.is_file():
        return "no such file"
    try:
        with Image.open(path) as im:
            size = im.size
            im.load()  # every pixel decoded: a truncated JPEG fails here, not in the middle of a run
    except Exception as exc:  # PIL raises many types for broken files
        return f"does not open as an image ({type(exc).__name__}: {exc})"
    w, h = size
    if max(w, h) >= MAX_ASPECT_RATIO * max(1, min(w, h)):
        ratio = max(w, h) / max(1, min(w, h))
        return f"is {w}x{h} pixels: aspect ratio {ratio:.0f}:1, Qwen3-VL takes under {MAX_ASPECT_RATIO}:1"
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="JSONL file to check")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder the image paths are relative to (default: the JSONL's folder)")
    parser.add_argument("--no-images", action="store_true", help="skip the image checks (exists, opens, size)")
    parser.add_argument("--skip-bbox-norm", choices=("auto", "true", "false"), default="auto",
                        help="true: require coord-token records; false: require pixel records; "
                             "auto (default): either, one kind per file")
    parser.add_argument("--max-problems", type=int, default=0, help="print at most this many (0: all)")


def run(args: argparse.Namespace) -> int:
    skip = {"auto": None, "true": True, "false": False}[args.skip_bbox_norm]
    checked = check_file(args.file, args.image_root, not args.no_images, skip)
    shown = checked.problems[:args.max_problems] if args.max_problems > 0 else checked.problems
    for problem in shown:
        print(problem)
    n_objects = sum(len(r.objects) for _, r in checked.records)
    if checked.problems:
        bad_lines = len({p.line for p in checked.problems})
        print(f"{args.file}: {len(checked.problems)} problems on {bad_lines} lines "
              f"({len(checked.records)} valid records)")
        return 1
    print(f"{args.file}: OK, {len(checked.records)} records, {n_objects} objects")
    return 0
