"""Read ground-truth and prediction JSONL into plain per-image records for scoring.

GT lines follow the data contract (``images``, ``width``, ``height``, ``objects`` with ``desc`` and one
of ``bbox_2d`` / ``poly``; values in pixels or ``"<|coord_k|>"`` strings). Prediction lines carry the
same keys plus a per-object ``score`` (mean probability of the 4 coord tokens) and per-line
``parse_status`` / ``parse_reasons``. Pairing is by ``images[0]``; a missing or duplicate image is an
error that names the file and line, because silently dropping images inflates every metric.

Example::

    >>> normalise_desc("  Red   Cup ")
    'red cup'
    >>> object_box({"bbox_2d": ["<|coord_0|>", "<|coord_0|>", "<|coord_500|>", "<|coord_250|>"]}, 200, 100)
    (0.0, 0.0, 100.0, 25.0)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from coordexp_rl.method.coords import bin_to_unit, parse_coord_token

PARSE_STATUSES = ("ok", "partial", "failed")


@dataclass
class ImageRecord:
    """One image: GT or predicted objects as pixel boxes ``(x1, y1, x2, y2)``."""

    image: str
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]
    descs: list[str]  # normalised (see normalise_desc)
    raw_descs: list[str]
    scores: list[float | None] = field(default_factory=list)  # predictions only
    object_scores: list[float | None] = field(default_factory=list)  # predictions: 'score_object' (desc x box)
    parse_status: str = "ok"
    parse_reasons: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "FILE line N", for error messages
    finish_reason: str | None = None  # predictions: the engine's "stop" / "length" / ...; None = not recorded


def normalise_desc(desc: str) -> str:
    """Lowercase, strip, collapse inner whitespace: the category key for exact matching."""
    return " ".join(str(desc).lower().split())


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file (a UTF-8 BOM and CRLF line ends are fine); each record gets ``_where = "FILE line N"``."""
    from coordexp_rl.data.validate import read_lines

    records = []
    for n, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg}); fix or remove that line") from exc
        if not isinstance(rec, dict):
            raise ValueError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
        rec["_where"] = f"{path} line {n}"
        records.append(rec)
    return records


def _coord_value(v: Any, size: int, where: str) -> float:
    if isinstance(v, str):
        k = parse_coord_token(v.strip())
        if k is None:
            raise ValueError(f"{where}: coordinate {v!r} is neither a number nor '<|coord_k|>' with k in 0..999")
        return bin_to_unit(k) * size
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: coordinate {v!r} is not a finite number")
    return float(v)


def object_box(
    obj: dict[str, Any], width: int, height: int, where: str = "object"
) -> tuple[float, float, float, float]:
    """Pixel box of one contract object; a ``poly`` becomes its enclosing box."""
    if "bbox_2d" in obj:
        vals = obj["bbox_2d"]
        if not isinstance(vals, Sequence) or len(vals) != 4:
            raise ValueError(f"{where}: bbox_2d must be [x1, y1, x2, y2], got {vals!r}")
        x1, y1, x2, y2 = (_coord_value(v, s, where) for v, s in zip(vals, (width, height, width, height)))
        return (x1, y1, x2, y2)
    if "poly" in obj:
        vals = obj["poly"]
        if not isinstance(vals, Sequence) or len(vals) < 4 or len(vals) % 2:
            raise ValueError(f"{where}: poly must be a flat [x1, y1, ..., xn, yn] list, got {vals!r}")
        xs = [_coord_value(v, width, where) for v in vals[0::2]]
        ys = [_coord_value(v, height, where) for v in vals[1::2]]
        return (min(xs), min(ys), max(xs), max(ys))
    raise ValueError(f"{where}: object has neither 'bbox_2d' nor 'poly'; add one geometry field")


def to_image_record(rec: dict[str, Any], *, is_pred: bool, index: int = 0) -> ImageRecord:
    """Check one JSONL record and convert it. A ``parse_status == "failed"`` line is an empty prediction."""
    where = rec.get("_where") or f"record {index}"
    images = rec.get("images")
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise ValueError(f"{where}: 'images' must be a non-empty list of paths")
    width, height = rec.get("width"), rec.get("height")
    if not isinstance(width, int) or not isinstance(height, int) or width <= 0 or height <= 0:
        raise ValueError(f"{where}: 'width' and 'height' must be positive integers, got {width!r}, {height!r}")
    status = str(rec.get("parse_status", "ok")) if is_pred else "ok"
    if status not in PARSE_STATUSES:
        raise ValueError(f"{where}: parse_status {status!r} is not one of {PARSE_STATUSES}")
    objects = rec.get("objects") or []
    if not isinstance(objects, list):
        raise ValueError(f"{where}: 'objects' must be a list")
    if status == "failed":
        objects = []  # an unparseable output counts as an empty prediction, never as a dropped image
    reasons = rec.get("parse_reasons") or {}
    if not isinstance(reasons, dict):
        raise ValueError(f"{where}: 'parse_reasons' must be a JSON object, got {type(reasons).__name__}")
    finish = rec.get("finish_reason") if is_pred else None
    if finish is not None and not isinstance(finish, str):
        raise ValueError(f"{where}: 'finish_reason' must be a string, got {finish!r}")
    out = ImageRecord(images[0], width, height, [], [], [], parse_status=status, parse_reasons=reasons, where=where,
                      finish_reason=finish)
    for j, obj in enumerate(objects):
        owhere = f"{where} objects[{j}]"
        if not isinstance(obj, dict) or not isinstance(obj.get("desc"), str):
            raise ValueError(f"{owhere}: each object needs a string 'desc'")
        out.boxes.append(object_box(obj, width, height, owhere))
        out.raw_descs.append(obj["desc"])
        out.descs.append(normalise_desc(obj["desc"]))
        out.scores.append(_optional_number(obj, "score", owhere))
        out.object_scores.append(_optional_number(obj, "score_object", owhere))
    return out


def _optional_number(obj: dict[str, Any], key: str, where: str) -> float | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where}: {key!r} must be a number, got {value!r}")
    return None if value is None else float(value)


def pair_records(
    gt_records: Iterable[dict[str, Any]], pred_records: Iterable[dict[str, Any]]
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Convert and align by ``images[0]``: returns (gt, pred) lists in GT order, one pred per GT image."""
    gts = [to_image_record(r, is_pred=False, index=i) for i, r in enumerate(gt_records)]
    preds = [to_image_record(r, is_pred=True, index=i) for i, r in enumerate(pred_records)]
    gt_by_image = _index_unique(gts, "ground truth")
    pred_by_image = _index_unique(preds, "predictions")
    missing = [g for g in gts if g.image not in pred_by_image]
    if missing:
        raise ValueError(
            f"{len(missing)} GT image(s) have no prediction line, first {missing[0].image!r} ({missing[0].where}); "
            "write one prediction line per input record (an empty 'objects' list when nothing was parsed)"
        )
    extra = [p for p in preds if p.image not in gt_by_image]
    if extra:
        raise ValueError(
            f"{len(extra)} prediction line(s) name an image absent from the GT, first {extra[0].image!r} "
            f"({extra[0].where}); check that --gt and --pred come from the same split"
        )
    paired = [pred_by_image[g.image] for g in gts]
    for g, p in zip(gts, paired):
        if (g.width, g.height) != (p.width, p.height):
            raise ValueError(f"{p.where}: size {p.width}x{p.height} differs from GT {g.width}x{g.height} ({g.where})")
    return gts, paired


def _index_unique(records: list[ImageRecord], what: str) -> dict[str, ImageRecord]:
    seen: dict[str, ImageRecord] = {}
    for r in records:
        if r.image in seen:
            raise ValueError(f"{what}: image {r.image!r} appears twice ({seen[r.image].where} and {r.where})")
        seen[r.image] = r
    return seen
