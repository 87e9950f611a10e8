"""The rollout row: the Arrow schema that crosses from rollout actors to the buffer and the learner.

One row is one generation for one image (docs/ROLLOUT_SCHEMA.md documents every field). Rows travel as
``pa.RecordBatch`` (through Ray's object store and into Parquet spill files); Python code on either side
works with ``RolloutRow``. The schema carries ``SCHEMA_VERSION`` in its metadata so that a reader never
silently misreads rows written by other code: bump it on any change to the fields.

>>> row = RolloutRow(sample_id="s0", generated_ids=[5, 6], logprobs=[-0.5, -0.25], weight_version=3)
>>> batch_to_rows(rows_to_batch([row])) == [row]
True
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import pyarrow as pa

from coordexp_rl.method.protocol import ParsedObject

SCHEMA_VERSION = 2  # 2: the row id (actor_id, seq)
VERSION_KEY = b"coordexp.rollout_schema_version"

OBJECT_TYPE = pa.struct([
    ("desc", pa.string()),
    ("bins", pa.list_(pa.int16(), 4)),  # (x1, y1, x2, y2), each 0..999
    ("coord_positions", pa.list_(pa.int32(), 4)),  # indices into generated_ids of the 4 coord tokens
    ("inverted", pa.bool_()),  # x2 < x1 or y2 < y1 (kept, flagged)
])

ROLLOUT_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_rel", pa.string()),
        ("image_sha256", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("generated_ids", pa.list_(pa.int32())),
        ("logprobs", pa.list_(pa.float32())),
        ("objects", pa.list_(OBJECT_TYPE)),
        ("parse_status", pa.string()),
        ("parse_reasons", pa.map_(pa.string(), pa.int32())),
        ("stray_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("weight_version", pa.int64()),
        ("engine", pa.string()),
        ("actor_id", pa.string()),
        ("t_generate_s", pa.float64()),
        ("t_parse_s", pa.float64()),
        ("created_at", pa.float64()),
        ("seq", pa.int64()),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


class SchemaError(ValueError):
    """A batch or file does not hold rollout rows of this code's schema version."""


@dataclass
class RolloutRow:
    """One generation. ``logprobs`` are stored as float32 (values round to float32 on the way in)."""

    sample_id: str
    image_rel: str = ""
    image_sha256: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # one per generated token
    objects: list[ParsedObject] = field(default_factory=list)
    parse_status: str = "failed"  # ok | partial | failed (protocol.ParseResult.status)
    parse_reasons: dict[str, int] = field(default_factory=dict)
    stray_tokens: int = 0
    finish_reason: str = ""  # stop | length | abort (engine's own word)
    weight_version: int = 0
    engine: str = ""
    actor_id: str = ""
    t_generate_s: float = 0.0
    t_parse_s: float = 0.0
    created_at: float = 0.0
    seq: int = 0  # with actor_id the row's id: the actor's row counter, continued across restarts/resumes


_ROW_FIELDS = [f.name for f in fields(RolloutRow)]
assert _ROW_FIELDS == ROLLOUT_SCHEMA.names, "RolloutRow and ROLLOUT_SCHEMA must list the same fields"


def rows_to_batch(rows: Sequence[RolloutRow]) -> pa.RecordBatch:
    """Rows -> one RecordBatch of ``ROLLOUT_SCHEMA`` (version in the metadata). Zero rows are allowed."""
    columns: dict[str, list] = {name: [] for name in _ROW_FIELDS}
    for row in rows:
        if len(row.logprobs) not in (0, len(row.generated_ids)):
            raise ValueError(f"rollout row {row.sample_id!r}: {len(row.logprobs)} logprobs for "
                             f"{len(row.generated_ids)} generated tokens; give one per token or none")
        for name in _ROW_FIELDS:
            columns[name].append(getattr(row, name))
    columns["objects"] = [[_object_to_dict(o) for o in objs] for objs in columns["objects"]]
    columns["parse_reasons"] = [list(r.items()) for r in columns["parse_reasons"]]
    arrays = [pa.array(columns[f.name], type=f.type) for f in ROLLOUT_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=ROLLOUT_SCHEMA)


def batch_to_rows(batch: pa.RecordBatch | pa.Table) -> list[RolloutRow]:
    """A checked batch (or table) -> rows; the exact inverse of ``rows_to_batch``."""
    check_schema(batch.schema)
    rows = []
    for rec in batch.to_pylist():
        rec["objects"] = [_object_from_dict(o) for o in rec["objects"]]
        rec["parse_reasons"] = dict(rec["parse_reasons"])
        rows.append(RolloutRow(**rec))
    return rows


def check_schema(schema: pa.Schema, where: str = "rollout batch") -> None:
    """Raise SchemaError unless ``schema`` is ROLLOUT_SCHEMA of SCHEMA_VERSION.

    ``where`` names the source (a file path, an actor) in the message.
    """
    found = (schema.metadata or {}).get(VERSION_KEY)
    if found is None:
        raise SchemaError(f"{where}: no rollout schema version in the Arrow metadata "
                          f"(key {VERSION_KEY.decode()!r}); build batches with rows_to_batch()")
    if found != str(SCHEMA_VERSION).encode():
        raise SchemaError(f"{where}: rollout schema version {found.decode()}, this code reads version "
                          f"{SCHEMA_VERSION}; read it with the code that wrote it or convert the rows")
    if not schema.equals(ROLLOUT_SCHEMA, check_metadata=False):
        diffs = [f"{f.name}: {f.type} (expected {ROLLOUT_SCHEMA.field(f.name).type})"
                 if f.name in ROLLOUT_SCHEMA.names else f"{f.name}: unexpected field" for f in schema
                 if f.name not in ROLLOUT_SCHEMA.names or not f.type.equals(ROLLOUT_SCHEMA.field(f.name).type)]
        missing = [n for n in ROLLOUT_SCHEMA.names if n not in schema.names]
        raise SchemaError(f"{where}: fields differ from rollout schema version {SCHEMA_VERSION}: "
                          f"{diffs + [f'{n}: missing' for n in missing] or 'field order'}")


def empty_batch() -> pa.RecordBatch:
    return rows_to_batch([])


def concat_batches(batches: Sequence[pa.RecordBatch]) -> pa.RecordBatch:
    """Several checked batches -> one (zero batches -> an empty batch)."""
    for b in batches:
        check_schema(b.schema)
    return pa.concat_batches(list(batches)) if batches else empty_batch()


def _object_to_dict(obj: ParsedObject) -> dict:
    return {"desc": obj.desc, "bins": list(obj.bins), "coord_positions": list(obj.coord_positions),
            "inverted": obj.inverted}


def _object_from_dict(rec: dict) -> ParsedObject:
    return ParsedObject(desc=rec["desc"], bins=tuple(rec["bins"]),
                        coord_positions=tuple(rec["coord_positions"]), inverted=rec["inverted"])
