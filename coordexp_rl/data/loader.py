"""Contract JSONL -> training samples, after the same checks as `coordexp-rl validate`.

``load_samples`` fails before any training starts, with one error that lists the problems.
Pixel boxes become bins by ``normalise_box`` then ``box_to_bins``; pre-tokenised boxes keep their bins.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from coordexp_rl.data.contract import TOKEN, Record
from coordexp_rl.data.paths import resolve_image_path
from coordexp_rl.data.validate import check_file
from coordexp_rl.errors import UserError
from coordexp_rl.method.coords import bins_to_pixels, box_to_bins, normalise_box
from coordexp_rl.method.protocol import BoxObject

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20


class DataError(UserError):
    """A data file breaks the contract; the message lists ``FILE:LINE: field: message`` lines."""

    kind = "data error"


@dataclass(frozen=True)
class Sample:
    """One training/evaluation image with its ground truth.

    objects: in file order, bins in 0..999 (the token-space target).
    boxes_px: the same boxes in pixels (floats), for evaluation; for pre-tokenised records these are
        the bins decoded back to pixels (``bins_to_pixels``).
    """

    sample_id: str
    image_path: Path  # absolute
    image_rel: str  # as written in the JSONL
    width: int
    height: int
    objects: list[BoxObject]
    boxes_px: list[tuple[float, float, float, float]]
    summary: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # 1-based line of the JSONL it came from (0: unknown), for error messages


def load_samples(path: str | Path, image_root: str | Path | None = None,
                 skip_bbox_norm: bool = False, check_images: bool = True) -> list[Sample]:
    """Read and check a contract JSONL file; raise ``DataError`` listing the problems if any.

    skip_bbox_norm: the config's ``data.skip_bbox_norm``; must be True exactly when the
        file holds pre-tokenised ``<|coord_k|>`` coordinates (a mismatch is reported per line).
    """
    path = Path(path)
    root = (Path(image_root) if image_root is not None else path.parent).resolve()
    checked = check_file(path, root, check_images=check_images, skip_bbox_norm=skip_bbox_norm)
    if checked.problems:
        raise DataError(_problem_report(path, root, checked.problems))
    samples = [record_to_sample(record, lineno, path.stem, root, checked.image_paths.get(record.image))
               for lineno, record in checked.records]
    collapsed = sum(o.bins[0] == o.bins[2] or o.bins[1] == o.bins[3] for s in samples for o in s.objects)
    if collapsed:
        log.warning("%s: %d boxes are thinner than one bin (x1 == x2 or y1 == y2 after binning)", path, collapsed)
    log.info("%s: %d samples, %d objects", path, len(samples), sum(len(s.objects) for s in samples))
    return samples


def record_to_sample(record: Record, lineno: int, stem: str, image_root: Path,
                     image_path: Path | None = None) -> Sample:
    """A checked record -> Sample (sample id: ``metadata["id"]`` if given, else ``"{stem}:{lineno}"``).

    image_path: the resolved path ``check_file`` found; None = resolve (and check) it here.
    """
    objects, boxes_px = [], []
    for obj in record.objects:
        box = obj.box()
        if obj.kind == TOKEN:
            bins = tuple(int(v) for v in box)
            px = bins_to_pixels(bins, record.width, record.height)
        else:
            px = tuple(float(v) for v in box)
            bins = box_to_bins(normalise_box(px, record.width, record.height))
        objects.append(BoxObject(desc=obj.desc, bins=bins))  # type: ignore[arg-type]
        boxes_px.append(px)
    metadata = dict(record.metadata or {})
    sample_id = str(metadata["id"]) if "id" in metadata else f"{stem}:{lineno}"
    if image_path is None:
        image_path = resolve_image_path(image_root, record.image)
    return Sample(sample_id=sample_id, image_path=image_path,
                  image_rel=record.image, width=record.width, height=record.height,
                  objects=objects, boxes_px=boxes_px, summary=record.summary, metadata=metadata,
                  line=lineno)


def load_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB (decoded now; the file is closed on return)."""
    return load_rgb(sample.image_path)


def load_rgb(path: str | Path) -> Image.Image:
    """The image file as RGB (decoded now; the file is closed on return). 16-bit and 32-bit integer images
    are scaled to 8 bits first (PIL's own conversion clips them, which turns a 16-bit PNG white)."""
    with Image.open(path) as im:
        if im.mode.startswith("I"):  # "I;16", "I;16B", "I": integer pixels, taken as 16-bit
            return Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)).convert("RGB")
        return im.convert("RGB")


def image_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (identifies the exact image a rollout row used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _problem_report(path: Path, root: Path, problems: list) -> str:
    lines = [str(p) for p in problems[:MAX_LISTED_PROBLEMS]]
    more = len(problems) - len(lines)
    if more:
        lines.append(f"... and {more} more")
    return (f"{path}: {len(problems)} problems with the data (image root {root}):\n  " + "\n  ".join(lines)
            + f"\nRun `coordexp-rl validate {path} --image-root {root}` for the full list.")
