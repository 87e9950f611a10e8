"""The rollout Arrow schema: exact round trips, version checks, Parquet and pickling survive."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordexp_rl.method.protocol import ParsedObject
from coordexp_rl.rollout.schema import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    VERSION_KEY,
    RolloutRow,
    SchemaError,
    batch_to_rows,
    check_schema,
    concat_batches,
    empty_batch,
    rows_to_batch,
)


def make_row(i: int = 0, version: int = 2) -> RolloutRow:
    # logprobs drawn as float32 so the float32 column holds them exactly
    lp = np.random.default_rng(i).normal(size=14).astype(np.float32).tolist()
    return RolloutRow(
        sample_id=f"coco/{i}", image_rel=f"images/{i:04d}.jpg", image_sha256="ab" * 32,
        prompt_ids=[151644, 872, 198, 2 ** 31 - 1], generated_ids=list(range(100 + i, 114 + i)), logprobs=lp,
        objects=[ParsedObject("black cat", (110, 310, 410, 705), (2, 3, 4, 5), False),
                 ParsedObject("yellow dog", (999, 0, 520, 660), (9, 10, 11, 12), True)],
        parse_status="partial", parse_reasons={"inverted_box": 1, "truncated_tail": 1}, stray_tokens=3,
        finish_reason="length", weight_version=version, engine="vllm", actor_id="rollout-0",
        t_generate_s=0.125, t_parse_s=1e-4, created_at=1_700_000_000.123456)


def test_round_trip_is_exact():
    rows = [make_row(0), make_row(1, version=7), RolloutRow(sample_id="empty")]
    batch = rows_to_batch(rows)
    assert batch.num_rows == 3
    assert batch.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    back = batch_to_rows(batch)
    assert back == rows
    assert back[0].objects[1].bins == (999, 0, 520, 660) and back[0].objects[1].inverted is True
    assert back[2].objects == [] and back[2].parse_reasons == {}


def test_column_types_are_compact():
    batch = rows_to_batch([make_row()])
    assert batch.schema.field("logprobs").type == pa.list_(pa.float32())
    assert batch.column("objects").type.value_type.field("bins").type == pa.list_(pa.int16(), 4)
    assert batch.column("weight_version").to_pylist() == [2]


def test_logprobs_round_to_float32():
    row = RolloutRow(sample_id="x", generated_ids=[1], logprobs=[0.1])
    (back,) = batch_to_rows(rows_to_batch([row]))
    assert back.logprobs == [float(np.float32(0.1))] and back.logprobs != [0.1]


def test_mismatched_logprobs_rejected():
    with pytest.raises(ValueError, match="2 logprobs for 3 generated tokens"):
        rows_to_batch([RolloutRow(sample_id="x", generated_ids=[1, 2, 3], logprobs=[0.0, 0.0])])


def test_other_version_rejected_with_clear_message():
    batch = rows_to_batch([make_row()])
    future = batch.replace_schema_metadata({VERSION_KEY: b"3"})
    with pytest.raises(SchemaError, match="rollout schema version 3, this code reads version 2"):
        batch_to_rows(future)
    with pytest.raises(SchemaError, match="no rollout schema version"):
        check_schema(batch.replace_schema_metadata(None).schema)


def test_changed_field_type_rejected():
    batch = rows_to_batch([make_row()])
    changed = batch.set_column(batch.schema.get_field_index("stray_tokens"), "stray_tokens",
                               pa.array([3], type=pa.int64()))
    changed = changed.replace_schema_metadata(ROLLOUT_SCHEMA.metadata)
    with pytest.raises(SchemaError, match="stray_tokens: int64 \\(expected int32\\)"):
        check_schema(changed.schema, where="actor 3")


def test_parquet_and_pickle_keep_schema(tmp_path):
    batch = rows_to_batch([make_row(0), make_row(1)])
    pq.write_table(pa.Table.from_batches([batch]), tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    assert batch_to_rows(table) == batch_to_rows(batch)
    assert batch_to_rows(pickle.loads(pickle.dumps(batch, protocol=5))) == batch_to_rows(batch)


def test_concat_and_empty():
    a, b = rows_to_batch([make_row(0)]), rows_to_batch([make_row(1), make_row(2)])
    both = concat_batches([a, b])
    assert [r.sample_id for r in batch_to_rows(both)] == ["coco/0", "coco/1", "coco/2"]
    assert concat_batches([]).num_rows == 0 and empty_batch().schema.equals(ROLLOUT_SCHEMA)
