"""The JSONL data contract (METHOD 3.2, docs/DATA_JSONL_CONTRACT.md): one pydantic model per line.

Two layers: the pydantic models check the *shape* of a line (types, required keys, no extra keys,
exactly one geometry per object, coordinate syntax); ``record_problems`` checks what needs the whole
record (one coordinate kind per record, boxes inside the image, positive area).

A coordinate is a pixel number or a pre-tokenised coord token ``"<|coord_k|>"``; after validation a
pixel coordinate is a ``float`` and a token is its bin, an ``int`` in 0..999 (see ``Coord``).

>>> rec = Record.model_validate({"images": ["a.png"], "width": 10, "height": 10,
...                               "objects": [{"desc": " cat ", "bbox_2d": [0, 0, 5, 5]}]})
>>> rec.objects[0].desc, rec.objects[0].box(), rec.kind
('cat', (0.0, 0.0, 5.0, 5.0), 'pixel')
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from coordexp_rl.method.coords import NUM_BINS, STRUCTURE_TOKENS, parse_coord_token

PIXEL = "pixel"  # coordinates are pixel numbers, normalised by width/height before binning
TOKEN = "token"  # coordinates are pre-tokenised "<|coord_k|>" bins; never normalised again
Kind = Literal["pixel", "token"]

# After validation: float = pixel coordinate, int = coord bin (the two never mix within a record).
Coord = float | int
Box = tuple[Coord, Coord, Coord, Coord]

PositiveInt = Annotated[int, Field(strict=True, gt=0)]


def _error(message: str) -> PydanticCustomError:
    # A custom error keeps the message as written (a plain ValueError gets a "Value error, " prefix).
    return PydanticCustomError("contract", message)


def parse_coords(values: list[Any]) -> list[Coord]:
    """Raw JSON values -> pixel floats or coord bins; raises on bools, NaN, junk strings or a mix.

    >>> parse_coords([1, 2.5]), parse_coords(["<|coord_0|>", "<|coord_999|>"])
    ([1.0, 2.5], [0, 999])
    """
    out: list[Coord] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            k = parse_coord_token(v)
            if k is None:
                raise _error(f"value {i} ({v!r}) is neither a number nor a coord token "
                             f"'<|coord_k|>' with k in 0..{NUM_BINS - 1}")
            out.append(k)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise _error(f"value {i} ({v!r}) is not a finite number")
            out.append(float(v))
        else:
            raise _error(f"value {i} ({v!r}) must be a number or a coord token string")
    if len({type(v) for v in out}) > 1:
        raise _error("mixes pixel numbers and coord tokens; use one kind per record "
                     "(all pixels, or all '<|coord_k|>' tokens)")
    return out


class ObjectSpec(BaseModel):
    """One annotated object: a description and exactly one geometry (``bbox_2d`` or ``poly``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    desc: Annotated[str, Field(strict=True)]
    bbox_2d: list[Any] | None = None  # [x1, y1, x2, y2]
    poly: list[Any] | None = None  # flat [x1, y1, ..., xn, yn], n >= 3

    @field_validator("desc")
    @classmethod
    def _desc(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise _error("must be a non-empty description")
        if "\n" in v or "\r" in v:
            raise _error("must be a single line")
        if "<|coord_" in v or any(t in v for t in STRUCTURE_TOKENS):
            raise _error("must not contain coord tokens or structure tokens (<obj>, <desc>, <box>, ...)")
        return v

    @field_validator("bbox_2d")
    @classmethod
    def _bbox(cls, v: list[Any] | None) -> list[Coord] | None:
        if v is None:
            return None
        if len(v) != 4:
            raise _error(f"needs 4 values [x1, y1, x2, y2], got {len(v)}")
        return parse_coords(v)

    @field_validator("poly")
    @classmethod
    def _poly(cls, v: list[Any] | None) -> list[Coord] | None:
        if v is None:
            return None
        if len(v) % 2 or len(v) < 6:
            raise _error(f"needs an even number (>= 6) of values [x1, y1, ..., xn, yn], got {len(v)}")
        return parse_coords(v)

    @model_validator(mode="after")
    def _one_geometry(self) -> "ObjectSpec":
        if (self.bbox_2d is None) == (self.poly is None):
            raise _error("needs exactly one geometry: 'bbox_2d' or 'poly'")
        return self

    @property
    def geometry_field(self) -> str:
        return "bbox_2d" if self.bbox_2d is not None else "poly"

    @property
    def coords(self) -> list[Coord]:
        return self.bbox_2d if self.bbox_2d is not None else self.poly  # type: ignore[return-value]

    @property
    def kind(self) -> Kind:
        return TOKEN if isinstance(self.coords[0], int) else PIXEL

    def box(self) -> Box:
        """``[x1, y1, x2, y2]``; a polygon gives its enclosing box (detection uses boxes only)."""
        c = self.coords
        if self.bbox_2d is not None:
            return (c[0], c[1], c[2], c[3])
        xs, ys = c[0::2], c[1::2]
        return (min(xs), min(ys), max(xs), max(ys))


class Record(BaseModel):
    """One JSONL line: one image (a list of exactly one path, for now) and its objects."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images: list[Annotated[str, Field(strict=True, min_length=1)]]
    width: PositiveInt
    height: PositiveInt
    objects: list[ObjectSpec]
    summary: Annotated[str, Field(strict=True)] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("images")
    @classmethod
    def _one_image(cls, v: list[str]) -> list[str]:
        if len(v) != 1:
            raise _error(f"needs exactly one image path per record (multi-image records are not supported "
                         f"yet), got {len(v)}")
        return v

    @field_validator("summary")
    @classmethod
    def _single_line(cls, v: str | None) -> str | None:
        if v is not None and ("\n" in v or "\r" in v):
            raise _error("must be a single line")
        return v

    @property
    def image(self) -> str:
        return self.images[0]

    @property
    def kind(self) -> Kind | None:
        """``pixel`` or ``token`` from the first object; None when there are no objects."""
        return self.objects[0].kind if self.objects else None


def record_problems(record: Record) -> list[tuple[str, str]]:
    """Whole-record checks -> ``[(field, message)]``: one kind, inside the image, positive area.

    Pixel boxes must satisfy ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height`` exactly (no
    tolerance; converters clip). Token boxes are always inside; they need ``x1 < x2`` and ``y1 < y2``.
    """
    problems: list[tuple[str, str]] = []
    for i, obj in enumerate(record.objects):
        field = f"objects[{i}].{obj.geometry_field}"
        if obj.kind != record.kind:
            problems.append((field, f"uses {obj.kind} coordinates but objects[0] uses {record.kind}; "
                                    "a record holds one kind"))
            continue
        x1, y1, x2, y2 = obj.box()
        if obj.kind == PIXEL:
            c = obj.coords
            xs, ys = c[0::2], c[1::2]
            if min(xs) < 0 or min(ys) < 0 or max(xs) > record.width or max(ys) > record.height:
                problems.append((field, f"{_fmt(c)} lies outside the image (0, 0, {record.width}, "
                                        f"{record.height}); clip it to the image"))
        if x2 <= x1 or y2 <= y1:
            what = "box" if obj.bbox_2d is not None else "polygon's enclosing box"
            problems.append((field, f"{what} {_fmt([x1, y1, x2, y2])} has zero or negative area "
                                    "(needs x1 < x2 and y1 < y2)"))
    return problems


def _fmt(values: list[Coord] | tuple) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else f"<|coord_{v}|>" for v in values) + "]"
