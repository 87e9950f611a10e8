"""The rollout actor: sharding, rows (parsed on the actor), counters; and the Ray path into the buffer."""

from __future__ import annotations

import pytest

from actors.rollout_actor import RolloutWorker, shard
from coordexp_rl.method.protocol import parse_ids
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
from coordexp_rl.rollout.schema import batch_to_rows
from tests.actors.conftest import PROMPT

SAMPLING = SamplingConfig(max_new_tokens=8)


def test_shard_takes_every_kth_item():
    assert shard(list(range(7)), 3, 0) == [0, 3, 6]
    assert shard(list(range(7)), 3, 2) == [2, 5]
    with pytest.raises(ValueError, match="outside 0..2"):
        shard([1], 3, 3)


@pytest.fixture(scope="module")
def items(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    out = []
    for i, im in enumerate(images * 2):  # 6 items
        path = folder / f"im{i}.png"
        im.save(path)
        out.append((f"s{i}", str(path), f"im{i}.png"))
    return out


@pytest.fixture(scope="module")
def worker(tiny_dir, items):
    w = RolloutWorker(EngineConfig(str(tiny_dir), kind="hf"), items, PROMPT, SAMPLING, batch_size=2,
                      actor_id="a1", num_shards=2, shard_index=1)
    yield w
    w.close()


def test_worker_generates_parsed_rows_for_its_shard(worker):
    batch = worker.generate_batch()
    rows = batch_to_rows(batch)
    assert [r.sample_id for r in rows] == ["s1", "s3"]  # shard 1 of 2: items 1, 3, 5
    assert [r.sample_id for r in batch_to_rows(worker.generate_batch())] == ["s5", "s1"]  # cycles
    for r in rows:
        assert len(r.generated_ids) == SAMPLING.max_new_tokens and r.finish_reason == "length"
        assert r.engine == "hf" and r.actor_id == "a1" and r.weight_version == 0
        assert len(r.image_sha256) == 64 and r.image_rel.endswith(".png")
        parsed = parse_ids(r.generated_ids, worker.tokenizer, worker.vocab)
        assert r.parse_status == parsed.status and r.objects == parsed.objects


def test_per_image_generates_each_item_that_many_times_in_a_row(tiny_dir, items):
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0)
    w = RolloutWorker(EngineConfig(str(tiny_dir), kind="hf"), items, PROMPT, sampling, batch_size=4,
                      actor_id="a2", num_shards=2, shard_index=1, per_image=2)
    try:
        rows = w.generate_rows()
        assert [(r.sample_id, r.seq) for r in rows] == [("s1", 0), ("s1", 1), ("s3", 2), ("s3", 3)]
        assert [it.sample_id for _, it in w.next_items(4)] == ["s5", "s5", "s1", "s1"]  # cycles
        assert rows[0].generated_ids != rows[1].generated_ids  # two hypotheses of one image
    finally:
        w.close()


def test_stats_count_what_was_generated(worker):
    before = worker.stats()
    rows = worker.generate_rows(3)
    after = worker.stats()
    assert after["images"] - before["images"] == 3
    assert after["generated_tokens"] - before["generated_tokens"] == sum(len(r.generated_ids) for r in rows)
    assert after["valid_objects"] - before["valid_objects"] == sum(len(r.objects) for r in rows)
    assert after["images_per_s"] == pytest.approx(after["images"] / after["seconds"])
    assert after["shard_size"] == 3


def test_rows_carry_the_new_weight_version(worker, tiny_dir):
    from tests.actors.conftest import checkpoint_state

    assert worker.load_weights(checkpoint_state(tiny_dir).items(), version=5) == 5
    assert {r.weight_version for r in worker.generate_rows(2)} == {5}


@pytest.mark.integration
def test_ray_actor_fills_the_buffer(ray_local, tiny_dir, items):
    from actors.buffer import RolloutBuffer
    from actors.rollout_actor import RolloutActor

    ray = ray_local
    buf = RolloutBuffer.remote(capacity=8)
    actor = RolloutActor.options(num_cpus=1).remote(
        EngineConfig(str(tiny_dir), kind="hf"), items, PROMPT, SAMPLING, batch_size=2, actor_id="r0",
        buffer=buf)
    assert ray.get(actor.run.remote(max_rows=4)) == 4
    got = batch_to_rows(ray.get(buf.get.remote(4, timeout_s=10)))
    assert sorted(r.sample_id for r in got) == ["s0", "s1", "s2", "s3"]
    stats = ray.get(actor.stats.remote())
    assert stats["images"] == 4 and stats["tokens_per_s"] > 0
    ray.kill(actor)
    ray.kill(buf)
