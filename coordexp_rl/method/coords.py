"""Coordinate binning (METHOD 3.3) and the coordinate vocabulary (METHOD 2.1, 10.1).

norm1000: a coordinate c in [0, 1] becomes bin ``clamp(round(1000 * c), 0, 999)`` and bin k decodes to
``k / 1000``. Bin 0 is the near edge, bin 999 lies just inside the far edge.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

NUM_BINS = 1000
COORD_TOKEN_RE = re.compile(r"^<\|coord_(\d{1,3})\|>$")

# Structure tokens of METHOD 1.1, in a fixed order (their ids follow the coord tokens when added).
OBJ_OPEN, OBJ_CLOSE = "<obj>", "</obj>"
DESC_OPEN, DESC_CLOSE = "<desc>", "</desc>"
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
STRUCTURE_TOKENS = (OBJ_OPEN, OBJ_CLOSE, DESC_OPEN, DESC_CLOSE, BOX_OPEN, BOX_CLOSE)


def coord_token(k: int) -> str:
    """``coord_token(7) == "<|coord_7|>"``."""
    if not 0 <= k < NUM_BINS:
        raise ValueError(f"coord bin {k} is outside 0..{NUM_BINS - 1}")
    return f"<|coord_{k}|>"


COORD_TOKENS = tuple(coord_token(k) for k in range(NUM_BINS))


def parse_coord_token(text: str) -> int | None:
    """``"<|coord_42|>" -> 42``; anything else (or a bin >= 1000) -> None."""
    m = COORD_TOKEN_RE.match(text)
    if m is None:
        return None
    k = int(m.group(1))
    return k if k < NUM_BINS else None


def coord_bin(c: float) -> int:
    """Normalised coordinate -> bin: ``coord_bin(0.5) == 500``, ``coord_bin(1.0) == 999``.

    Python's round() rounds halves to even; we round halves up so that bins stay evenly spaced.
    """
    return min(max(math.floor(float(c) * NUM_BINS + 0.5), 0), NUM_BINS - 1)


def bin_to_unit(k: int) -> float:
    """Bin -> normalised coordinate: ``bin_to_unit(500) == 0.5``."""
    return k / NUM_BINS


def normalise_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Pixel box ``[x1, y1, x2, y2]`` -> ``[0, 1]`` box (not clamped; binning clamps)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def box_to_bins(box_unit: Sequence[float]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (coord_bin(v) for v in box_unit)
    return (x1, y1, x2, y2)


def bins_to_pixels(bins: Sequence[int], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = bins
    return (bin_to_unit(x1) * width, bin_to_unit(y1) * height, bin_to_unit(x2) * width, bin_to_unit(y2) * height)


@dataclass(frozen=True)
class CoordVocab:
    """Token ids of the 1000 coord tokens (in bin order) and of the structure tokens."""

    coord_ids: tuple[int, ...]
    obj_open: int
    obj_close: int
    desc_open: int
    desc_close: int
    box_open: int
    box_close: int
    eos_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CoordVocab":
        unk = getattr(tokenizer, "unk_token_id", None)
        names = list(COORD_TOKENS) + list(STRUCTURE_TOKENS)
        ids = tokenizer.convert_tokens_to_ids(names)
        missing = [n for n, i in zip(names, ids) if i is None or i == unk]
        if missing:
            raise ValueError(
                f"tokenizer lacks {len(missing)} coord/structure tokens (first: {missing[:3]}); "
                "run `coordexp-rl add-coord-tokens --model DIR --out DIR` on the model folder first"
            )
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if eos is None or eos == unk:
            eos = tokenizer.eos_token_id
        coord, (oo, oc, do, dc, bo, bc) = ids[:NUM_BINS], ids[NUM_BINS:]
        return cls(tuple(coord), oo, oc, do, dc, bo, bc, int(eos))

    @property
    def structure_ids(self) -> tuple[int, ...]:
        return (self.obj_open, self.obj_close, self.desc_open, self.desc_close, self.box_open, self.box_close)

    def id_to_bin(self) -> dict[int, int]:
        return {tid: k for k, tid in enumerate(self.coord_ids)}

    def bin_of(self, token_id: int) -> int | None:
        return self._bins.get(token_id)

    @property
    def _bins(self) -> dict[int, int]:
        # Cached lazily; frozen dataclass so go through object.__setattr__.
        cache = self.__dict__.get("_bin_cache")
        if cache is None:
            cache = self.id_to_bin()
            object.__setattr__(self, "_bin_cache", cache)
        return cache
