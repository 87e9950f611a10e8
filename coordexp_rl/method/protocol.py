"""The token protocol of METHOD 1: building object records and parsing them back.

A record is ``<obj><desc> text </desc><box> cx1 cy1 cx2 cy2 </box></obj>`` where each ``c`` is one
``<|coord_k|>`` token. The assistant turn is the records in order followed by the end-of-turn token.
The parser works on token ids (never on decoded text), so coord positions are exact.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from coordexp_rl.method.coords import CoordVocab

# Why a record was dropped. Each is reported per record; the parser never raises on model output.
UNCLOSED = "unclosed_record"  # a new <obj> started before </obj>
TRUNCATED = "truncated_tail"  # the sequence ended inside a record
MISSING_DESC = "missing_desc"  # no <desc> ... </desc> at the start of the record
EMPTY_DESC = "empty_desc"
COORD_IN_DESC = "coord_in_desc"
MISSING_BOX = "missing_box"  # no <box> ... </box> right after the desc
COORD_COUNT = "coord_count"  # the box does not hold exactly 4 coord tokens and nothing else
TRAILING_TOKENS = "trailing_tokens"  # tokens between </box> and </obj>
# Flag (record kept): x2 < x1 or y2 < y1.
INVERTED_BOX = "inverted_box"


class ProtocolError(ValueError):
    """Raised by strict parsing (ground truth) and by the builder on invalid objects."""


@dataclass(frozen=True)
class BoxObject:
    """An object in token space: description text and 4 coord bins (x1, y1, x2, y2), each 0..999."""

    desc: str
    bins: tuple[int, int, int, int]


@dataclass(frozen=True)
class ParsedObject(BoxObject):
    coord_positions: tuple[int, int, int, int] = (0, 0, 0, 0)  # indices of the 4 coord tokens
    inverted: bool = False


@dataclass
class ParseResult:
    objects: list[ParsedObject] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)
    stray_tokens: int = 0  # tokens outside any record (ignored)
    ended: bool = False  # the end-of-turn token was seen

    @property
    def num_records(self) -> int:
        return len(self.objects) + len(self.dropped)

    @property
    def reasons(self) -> dict[str, int]:
        counts = Counter(reason for _, reason in self.dropped)
        flagged = sum(o.inverted for o in self.objects)
        if flagged:
            counts[INVERTED_BOX] = flagged
        return dict(counts)

    @property
    def status(self) -> str:
        """``ok`` (every record kept, ended), ``partial`` (some kept) or ``failed`` (none usable)."""
        if not self.objects and (self.dropped or self.stray_tokens or not self.ended):
            return "failed"
        if self.dropped or not self.ended or self.stray_tokens:
            return "partial"
        return "ok"


def build_assistant_ids(objects: Iterable[BoxObject], tokenizer, vocab: CoordVocab) -> list[int]:
    """Objects -> assistant token ids: the records in the given order, then end-of-turn.

    >>> build_assistant_ids([BoxObject("cat", (1, 2, 3, 4))], tok, vocab)  # doctest: +SKIP
    [<obj>, <desc>, *ids("cat"), </desc>, <box>, c1, c2, c3, c4, </box>, </obj>, <|im_end|>]
    """
    ids: list[int] = []
    for obj in objects:
        if not obj.desc.strip():
            raise ProtocolError(f"object {obj!r}: empty description")
        if len(obj.bins) != 4 or any(not 0 <= int(b) < len(vocab.coord_ids) for b in obj.bins):
            raise ProtocolError(f"object {obj!r}: needs 4 coord bins in 0..{len(vocab.coord_ids) - 1}")
        desc_ids = tokenizer.encode(obj.desc, add_special_tokens=False)
        if any(vocab.bin_of(t) is not None or t in vocab.structure_ids for t in desc_ids):
            raise ProtocolError(f"object {obj!r}: description contains coord or structure tokens")
        ids += [vocab.obj_open, vocab.desc_open, *desc_ids, vocab.desc_close, vocab.box_open]
        ids += [vocab.coord_ids[int(b)] for b in obj.bins]
        ids += [vocab.box_close, vocab.obj_close]
    ids.append(vocab.eos_id)
    return ids


def parse_ids(ids: Sequence[int], tokenizer, vocab: CoordVocab, *, offset: int = 0,
              strict: bool = False) -> ParseResult:
    """Generated ids -> objects with coord positions (``offset`` is added to every position).

    Deterministic; with ``strict=False`` it never raises. ``strict=True`` (ground truth) raises
    ProtocolError on any dropped record, flagged box or stray token.
    """
    result = ParseResult()
    record: list[int] | None = None  # indices into ids of the open record
    start = 0
    for i, tok in enumerate(ids):
        if tok == vocab.eos_id:
            result.ended = True
            break
        if tok == vocab.obj_open:
            if record is not None:
                result.dropped.append((result.num_records, UNCLOSED))
            record, start = [], i
        elif record is None:
            result.stray_tokens += 1
        elif tok == vocab.obj_close:
            _parse_record(ids, start + 1, i, tokenizer, vocab, offset, result)
            record = None
        else:
            record.append(i)
    if record is not None:
        result.dropped.append((result.num_records, TRUNCATED))
    if strict and (result.dropped or result.stray_tokens or not result.ended or result.reasons):
        raise ProtocolError(f"ground-truth sequence breaks the protocol: reasons={result.reasons}, "
                            f"stray_tokens={result.stray_tokens}, ended={result.ended}")
    return result


def _parse_record(ids: Sequence[int], lo: int, hi: int, tokenizer, vocab: CoordVocab, offset: int,
                  result: ParseResult) -> None:
    """Parse ``ids[lo:hi]`` (between <obj> and </obj>) and append the object or the drop reason."""
    index = result.num_records
    body = ids[lo:hi]
    if not body or body[0] != vocab.desc_open or vocab.desc_close not in body:
        result.dropped.append((index, MISSING_DESC))
        return
    dc = body.index(vocab.desc_close)
    desc_ids = body[1:dc]
    if any(vocab.bin_of(t) is not None for t in desc_ids):
        result.dropped.append((index, COORD_IN_DESC))
        return
    if any(t in vocab.structure_ids for t in desc_ids):
        result.dropped.append((index, MISSING_DESC))
        return
    desc = tokenizer.decode(desc_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if not desc.strip():
        result.dropped.append((index, EMPTY_DESC))
        return
    rest = body[dc + 1:]
    if not rest or rest[0] != vocab.box_open or vocab.box_close not in rest:
        result.dropped.append((index, MISSING_BOX))
        return
    bc = rest.index(vocab.box_close)
    box = rest[1:bc]
    bins = [vocab.bin_of(t) for t in box]
    if len(bins) != 4 or any(b is None for b in bins):
        result.dropped.append((index, COORD_COUNT))
        return
    if bc != len(rest) - 1:
        result.dropped.append((index, TRAILING_TOKENS))
        return
    first = lo + dc + 1 + 1 + offset  # position of the first coord token
    x1, y1, x2, y2 = bins
    result.objects.append(ParsedObject(desc=desc, bins=(x1, y1, x2, y2),
                                       coord_positions=(first, first + 1, first + 2, first + 3),
                                       inverted=x2 < x1 or y2 < y1))


def canonical_order(objects: Sequence[BoxObject]) -> list[BoxObject]:
    """Stage-1 order: top-to-bottom, then left-to-right, by (y1, x1); ties keep input order."""
    return sorted(objects, key=lambda o: (o.bins[1], o.bins[0]))


def random_order(objects: Sequence[BoxObject], seed: int) -> list[BoxObject]:
    """A seeded shuffle, for order-robustness studies."""
    shuffled = list(objects)
    random.Random(seed).shuffle(shuffled)
    return shuffled
