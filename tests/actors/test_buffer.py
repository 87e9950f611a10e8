"""The rollout buffer: BufferCore logic in-process, then the real Ray actor (back-pressure, exactly-once,
staleness admission, spill + replay)."""

import asyncio
import os
import time

import pytest
import ray

from actors.buffer import AsyncRolloutBuffer, BufferCore
from actors.spill import SpillWriter, replay
from coordexp_rl.method.protocol import ParsedObject
from coordexp_rl.rollout.schema import RolloutRow, batch_to_rows, rows_to_batch


def batch(ids, version=0, actor="p"):
    """Rows named by ``ids``; ``version`` is one int or one per row."""
    versions = version if isinstance(version, list) else [version] * len(ids)
    return rows_to_batch([RolloutRow(sample_id=str(i), generated_ids=[1, 2], logprobs=[-0.5, -1.0],
                                     objects=[ParsedObject("cat", (1, 2, 3, 4), (0, 1, 2, 3))],
                                     weight_version=v, actor_id=actor) for i, v in zip(ids, versions)])


def ids_of(b) -> list[str]:
    return b.column("sample_id").to_pylist()


# ---------------------------------------------------------------- BufferCore, no Ray

def test_fifo_slices_batches_and_hands_each_row_once():
    core = BufferCore(capacity=10)
    assert core.offer(batch("abc")) and core.offer(batch("de"))
    assert ids_of(core.take(4)) == ["a", "b", "c", "d"]
    assert ids_of(core.take(4)) == ["e"]
    assert core.take(4) is None
    s = core.stats()
    assert (s["puts"], s["rows_in"], s["gets"], s["rows_out"], s["size"]) == (2, 5, 2, 5, 0)


def test_capacity_refuses_when_full_but_empty_buffer_takes_any_batch():
    core = BufferCore(capacity=4)
    assert core.offer(batch("abc"))
    assert not core.offer(batch("de"))  # 3 + 2 > 4
    assert core.offer(batch("d")) and core.size == 4
    core.take(4)
    assert core.offer(batch("uvwxyz")) and core.size == 6  # bigger than capacity, but nothing waits forever
    assert not core.offer(batch("q"))


def test_offer_drops_stale_rows_and_counts_them():
    core = BufferCore(capacity=10, max_staleness=1, version=5)  # min usable version 4
    assert core.offer(batch("abcd", version=[3, 4, 5, 2]))
    assert ids_of(core.take(10)) == ["b", "c"]
    assert core.stats()["stale_dropped"] == 2 and core.stats()["rows_in"] == 4


def test_set_version_purges_rows_that_became_stale():
    core = BufferCore(capacity=10, max_staleness=1, version=5)
    core.offer(batch("ab", version=4))
    core.offer(batch("cd", version=[5, 4]))
    assert core.set_version(6) == 3  # min usable version 5: only "c" survives
    assert core.size == 1 and ids_of(core.take(5)) == ["c"]
    with pytest.raises(ValueError, match="went back from 6 to 5"):
        core.set_version(5)


def test_permits_on_policy():
    # learner takes 4 rows per update; on-policy: only rows of the current version are usable
    core = BufferCore(capacity=8, max_staleness=0, rows_per_version=4)
    assert core.budget(0) == 4  # min(8 - 0, 1 * 4 - 0)
    assert core.grant(3, actor_version=0, actor_id="p") == 3
    assert core.grant(3, actor_version=0, actor_id="p") == 1  # 4 - 3 outstanding
    assert core.grant(1, actor_version=0, actor_id="p") == 0
    core.offer(batch("abcd", version=0))  # uses up the 4 permits
    assert core.stats()["outstanding_permits"] == 0 and core.budget(0) == 0
    core.take(4)
    assert core.budget(0) == 0  # the learner already took its 4 rows of version 0
    core.set_version(1)
    assert core.budget(0) == 0  # engine must sync weights first
    assert core.budget(1) == 4


def test_permits_with_staleness_and_release():
    core = BufferCore(capacity=6, max_staleness=1, rows_per_version=4)
    assert core.budget(0) == 6  # min(6 - 0, 2 * 4 - 0): capacity binds
    assert core.grant(6, 0, "p") == 6
    core.release(2, "p")
    assert core.budget(0) == 2
    core.offer(batch("abcd"))  # 4 of the outstanding 4 permits used
    assert core.stats()["outstanding_permits"] == 0 and core.budget(0) == 2
    core.take(4)
    assert core.budget(0) == 4  # min(6 - 0, 8 - 4 taken)
    core.set_version(1)
    assert core.budget(0) == 4  # version-0 rows usable while learner is at 1: min(6, 1 * 4 - 0)
    assert core.budget(1) == 6  # min(6, 2 * 4)


def seq_batch(actor, seqs, version=0):
    return rows_to_batch([RolloutRow(sample_id=f"{actor}{q}", weight_version=version, actor_id=actor, seq=q)
                          for q in seqs])


def test_a_restarted_actor_gets_its_next_seq_and_its_old_permits_are_void():
    core = BufferCore(capacity=8, next_seq={"a": 5})  # a resumed run: actor a's rows 0..4 were consumed
    assert core.register("a") == 5 and core.register("b") == 0
    core.offer(seq_batch("a", [5, 6]))
    assert core.grant(4, 0, "a") == 4 and core.grant(2, 0, "b") == 2
    assert core.budget(0) == 0  # 8 - 2 rows - 6 permits
    # actor a dies after its grant (rows never put); Ray restarts it and it registers again
    assert core.register("a") == 7  # continues after the last row the buffer accepted
    assert core.stats()["outstanding_permits"] == 2 and core.budget(0) == 4  # a's 4 permits are void
    assert core.stats()["lost_rows"] == 4  # the rows it was generating died with it (generated again)
    core.offer(seq_batch("b", [0, 1]))
    assert core.stats()["outstanding_permits"] == 0


@pytest.mark.integration
def test_ray_interrupt_wakes_a_waiting_get_with_none(buffer_actor):
    buf = buffer_actor(capacity=4)
    waiting = buf.get.remote(2, timeout_s=60.0)
    ready, _ = ray.wait([waiting], timeout=0.3)
    assert not ready
    start = time.monotonic()
    ray.get(buf.interrupt.remote())
    assert ray.get(waiting) is None and time.monotonic() - start < 5.0
    assert ray.get(buf.get.remote(1, timeout_s=60.0)) is None  # at once, not after 60 s


@pytest.mark.integration
def test_ray_register_hands_out_the_newest_weights_ref(buffer_actor):
    buf = buffer_actor(capacity=4)
    assert ray.get(buf.register.remote("a")) == {"next_seq": 0, "weights": (0, [])}
    for v in (1, 2):
        ray.get(buf.keep_weights.remote(v, [ray.put({"version": v})]))
    version, refs = ray.get(buf.register.remote("a"))["weights"]
    assert version == 2 and ray.get(refs[0]) == {"version": 2}


def test_spill_writer_files_and_replay(tmp_path):
    writer = SpillWriter(tmp_path, rows_per_file=3)
    assert writer.write(batch("ab")) == 0 and writer.write(batch("cd")) == 1  # 4 rows >= 3: one file
    assert writer.write(batch("e")) == 0 and writer.flush() == 1
    assert sorted(os.listdir(tmp_path)) == ["rollouts-000000.parquet", "rollouts-000001.parquet"]
    again = SpillWriter(tmp_path)  # a resumed run continues the numbering instead of overwriting
    again.write(batch("f"))
    assert [ids_of(b) for b in replay(tmp_path)] == [["a", "b", "c", "d"], ["e"], ["f"]]


def test_core_spills_every_handed_row(tmp_path):
    core = BufferCore(capacity=10, spill_dir=tmp_path)
    core.offer(batch("abc"))
    first, second = core.take(2), core.take(2)
    core.close()
    replayed = list(replay(tmp_path))
    assert [batch_to_rows(b) for b in replayed] == [batch_to_rows(first), batch_to_rows(second)]
    assert core.stats()["spilled_rows"] == 3 and core.stats()["spill_files"] == 2


def test_async_get_waits_for_min_rows_and_times_out():
    async def scenario():
        buf = AsyncRolloutBuffer(capacity=4)
        await buf.put(batch("ab"))
        assert await buf.get(3, timeout_s=0.05) is None  # only 2 of 3 rows: nothing taken
        assert ids_of(await buf.get(3, timeout_s=0.05, min_rows=1)) == ["a", "b"]
        await buf.put(batch("cdef"))
        assert await buf.put(batch("g"), timeout_s=0.05) is False  # full: back-pressure
        stats = await buf.stats()
        assert stats["put_timeouts"] == 1 and stats["blocked_s"] >= 0.05
    asyncio.run(scenario())


def test_async_wake_lets_one_waiting_get_go():
    """The driver's wake (an actor died): the learner's get returns at once, with None unless its rows
    are there, and only once."""
    async def scenario():
        buf = AsyncRolloutBuffer(capacity=4)
        waiting = asyncio.create_task(buf.get(2, timeout_s=30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await buf.wake()
        assert await asyncio.wait_for(waiting, 5) is None
        await buf.put(batch("a"))
        await buf.wake()  # before the get: that get is the one let go (nothing taken, 1 of 2 rows)
        assert await asyncio.wait_for(buf.get(2, timeout_s=30), 5) is None
        assert await buf.get(2, timeout_s=0.05) is None  # used up: the next get waits (and times out)
        await buf.put(batch("b"))
        await buf.wake()
        assert ids_of(await buf.get(2, timeout_s=0.05)) == ["a", "b"]  # rows there: a woken get takes them
    asyncio.run(scenario())


# ---------------------------------------------------------------- the Ray actor

@pytest.fixture
def buffer_actor(ray_local):
    from actors.buffer import RolloutBuffer
    created = []

    def make(**kwargs):
        created.append(RolloutBuffer.remote(**kwargs))
        return created[-1]
    yield make
    for actor in created:
        ray.kill(actor)


@pytest.mark.integration
def test_ray_put_blocks_when_full_and_continues_after_get(buffer_actor):
    buf = buffer_actor(capacity=3)
    assert ray.get(buf.put.remote(batch("abc")))
    blocked = buf.put.remote(batch("de"))
    ready, _ = ray.wait([blocked], timeout=0.5)
    assert not ready  # the producer is held while the buffer is full
    assert ids_of(ray.get(buf.get.remote(2))) == ["a", "b"]
    assert ray.get(blocked, timeout=10) is True
    assert ids_of(ray.get(buf.get.remote(3))) == ["c", "d", "e"]
    stats = ray.get(buf.stats.remote())
    assert stats["blocked_s"] >= 0.5 and stats["size"] == 0


@ray.remote(num_cpus=0.5)
def produce(buf, name: str, n_batches: int, rows_per_batch: int) -> int:
    for b in range(n_batches):
        ids = [f"{name}-{b}-{r}" for r in range(rows_per_batch)]
        while not ray.get(buf.put.remote(batch(ids, actor=name), timeout_s=5.0)):
            pass  # timed out while full: try again
    return n_batches * rows_per_batch


@pytest.mark.integration
def test_ray_exactly_once_two_producers_one_consumer(buffer_actor):
    buf = buffer_actor(capacity=5)  # small, so producers block often
    producers = [produce.remote(buf, name, 10, 3) for name in ("p0", "p1")]
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while len(seen) < 60 and time.monotonic() < deadline:
        got = ray.get(buf.get.remote(4, timeout_s=1.0, min_rows=1))
        if got is not None:
            seen += ids_of(got)
    assert sum(ray.get(producers)) == 60
    assert len(seen) == 60 and len(set(seen)) == 60  # every row once, none twice
    assert set(seen) == {f"{p}-{b}-{r}" for p in ("p0", "p1") for b in range(10) for r in range(3)}
    for p in ("p0", "p1"):  # each producer's rows keep their order
        mine = [s for s in seen if s.startswith(p)]
        assert mine == sorted(mine, key=lambda s: tuple(map(int, s.split("-")[1:])))
    assert ray.get(buf.get.remote(1, timeout_s=0.1)) is None
    stats = ray.get(buf.stats.remote())
    assert (stats["rows_in"], stats["rows_out"], stats["stale_dropped"]) == (60, 60, 0)


@pytest.mark.integration
def test_ray_staleness_admission(buffer_actor):
    buf = buffer_actor(capacity=8, max_staleness=1, rows_per_version=2)
    ray.get(buf.set_version.remote(3))  # usable versions: 2 and 3
    assert ray.get(buf.acquire.remote(5, actor_version=1, actor_id="p")) == 0  # stale engine: sync first
    assert ray.get(buf.acquire.remote(5, actor_version=2, actor_id="p")) == 2  # usable while learner at 3: 1 * 2 rows
    assert ray.get(buf.put.remote(batch("ab", version=2)))
    waiting = buf.acquire.remote(2, actor_version=2, timeout_s=10.0, actor_id="p")
    ready, _ = ray.wait([waiting], timeout=0.3)
    assert not ready  # the learner cannot use more version-2 rows: no permit yet
    assert ray.get(buf.put.remote(batch("xyz", version=[1, 3, 0]))) is True
    assert ids_of(ray.get(buf.get.remote(3))) == ["a", "b", "y"]
    ray.get(buf.set_version.remote(4))  # version 2 now too old; the waiting engine gets nothing, at once
    start = time.monotonic()
    assert ray.get(waiting) == 0
    assert time.monotonic() - start < 5.0
    assert ray.get(buf.acquire.remote(4, actor_version=4, actor_id="p")) == 4
    stats = ray.get(buf.stats.remote())
    assert stats["stale_dropped"] == 2 and stats["version"] == 4


@pytest.mark.integration
def test_ray_spill_and_replay_round_trip(buffer_actor, tmp_path):
    buf = buffer_actor(capacity=10, spill_dir=str(tmp_path / "spill"))
    ray.get(buf.put.remote(batch("abcde", version=0)))
    handed = [ray.get(buf.get.remote(2)), ray.get(buf.get.remote(3))]
    stats = ray.get(buf.close.remote())
    assert stats["spill_files"] == 2 and stats["spilled_rows"] == 5
    replayed = list(replay(tmp_path / "spill"))
    assert [batch_to_rows(b) for b in replayed] == [batch_to_rows(b) for b in handed]
    assert [ids_of(b) for b in replayed] == [["a", "b"], ["c", "d", "e"]]
