"""The rollout buffer between rollout actors (producers) and the learner (the one consumer).

Rows are Arrow record batches of ``coordexp_rl.rollout.schema`` from end to end; they cross process
boundaries through Ray's object store as batches, never as pickled Python lists.

Three layers, so that everything but the Ray call itself is testable in one process:
- ``BufferCore``: the plain, non-blocking logic (FIFO of batches, capacity, staleness, permits, spill).
- ``AsyncRolloutBuffer``: adds waiting with asyncio (blocking ``put`` = back-pressure, blocking ``get``).
- ``RolloutBuffer = ray.remote(AsyncRolloutBuffer)``: an async Ray actor.

Back-pressure: ``put`` awaits while the buffer is full (up to ``timeout_s``; then it returns False and the
producer calls again). Waiting inside the actor wakes the producer the moment a ``get`` frees room, with
no polling or backoff RPCs; and because the actor is async, a waiting ``put`` holds no thread, so the
learner's ``get`` always gets in (a threaded actor whose threads are all held by blocked puts deadlocks).

Staleness (weight versions): the learner announces its version with ``set_version(v)``; rows with
``weight_version < v - max_staleness`` are dropped and counted (``stale_dropped``), never handed out.
Dropping wastes generation, so producers should ask first: ``acquire(n, actor_version)`` grants permits
to generate at most as many rows as the learner can still use within the staleness bound (and the free
capacity); a ``put`` uses up permits, ``release`` returns unused ones. ``max_staleness=0`` is on-policy.

Faults: permits are counted per actor, and ``register(actor_id)`` (what a (re)started rollout actor calls
first) voids the permits of that actor's previous life, so a killed actor leaks none. The buffer also
remembers, per actor, the next row sequence number (rows carry the id ``(actor_id, seq)``) and the
newest weights the driver left there (an object-store ref), which a restarted actor loads before it generates.
``interrupt()`` wakes a waiting ``get`` with None, so a learner blocked on a buffer that no actor fills
any more can be stopped; ``wake()`` does it once, so the driver can use the learner and then go on.

A dead buffer (``buffer.max_restarts``): Ray restarts it empty, and it serves nobody until it is restored
from the learner's consumed row ids, which the learner's next ``get`` brings. ``restore`` drops whatever is
held, voids every permit and sets each actor's next seq to the learner's: actors register again (a put or
an acquire of an actor that has not is refused) and generate the lost rows again, with the same ids, so the
learner sees every id once. The driver calls it too after a learner restart, with a version floor: rows of
weights the lost learner published are refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.spill import SpillWriter
from coordexp_rl.rollout.schema import check_schema, concat_batches

log = logging.getLogger(__name__)


@dataclass
class BufferCounters:
    puts: int = 0  # batches accepted
    rows_in: int = 0  # rows accepted (before staleness drops)
    gets: int = 0  # non-empty batches handed out
    rows_out: int = 0
    stale_dropped: int = 0  # rows never handed out because their weights were too old
    put_timeouts: int = 0  # puts that gave up while the buffer stayed full
    blocked_s: float = 0.0  # total time producers waited for room
    get_wait_s: float = 0.0  # total time the learner waited for rows
    permits_granted: int = 0
    spilled_rows: int = 0
    spill_files: int = 0
    restores: int = 0  # restore() calls (a restarted buffer, a restarted learner)
    restore_dropped: int = 0  # rows held when restored (dropped: generated again)
    regenerated_rows: int = 0  # rows the actors had generated past the restored ids (generated again)
    refused_rows: int = 0  # rows put by an actor that had not registered since the restore
    lost_rows: int = 0  # rows a dead actor (its process, its node) was generating: voided at its restart


class BufferCore:
    """Bounded FIFO of rollout rows with staleness admission and optional spill; non-blocking.

    >>> from coordexp_rl.rollout.schema import RolloutRow, rows_to_batch
    >>> core = BufferCore(capacity=4)
    >>> core.offer(rows_to_batch([RolloutRow("a"), RolloutRow("b"), RolloutRow("c")]))
    True
    >>> core.take(2).column("sample_id").to_pylist(), core.size
    (['a', 'b'], 1)
    """

    def __init__(self, capacity: int, max_staleness: int = 0, rows_per_version: int | None = None,
                 spill_dir: str | os.PathLike | None = None, spill_rows_per_file: int = 0,
                 version: int = 0, next_seq: dict[str, int] | None = None):
        """``next_seq``: per actor, the seq of its next row (a resumed run continues the ids)."""
        if capacity <= 0:
            raise ValueError(f"buffer capacity must be positive, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0 = on-policy), got {max_staleness}")
        if rows_per_version is not None and rows_per_version <= 0:
            raise ValueError(f"rows_per_version must be positive or None, got {rows_per_version}")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.rows_per_version = rows_per_version  # rows the learner consumes per weight update
        self.version = version
        self.counters = BufferCounters()
        self._queue: deque[pa.RecordBatch] = deque()
        self._size = 0
        self._permits: dict[str, int] = {}  # per actor: permits granted whose rows have not been put yet
        self._next_seq: dict[str, int] = dict(next_seq or {})  # per actor: the seq its next row gets
        self._taken_at_version = 0  # rows handed out since the last set_version
        self._floor = 0  # rows of older weights are refused whatever the staleness (restore(floor=True))
        self._spill = SpillWriter(spill_dir, spill_rows_per_file) if spill_dir else None

    @property
    def size(self) -> int:
        return self._size

    @property
    def min_version(self) -> int:
        """Oldest weight version whose rows the learner may still use."""
        return max(self.version - self.max_staleness, self._floor)

    def fresh_rows(self, batch: pa.RecordBatch) -> int:
        return batch.num_rows - self._stale_count(batch)

    def can_put(self, batch: pa.RecordBatch) -> bool:
        """Room for the batch's fresh rows; an empty buffer takes any batch, so none waits forever."""
        fresh = self.fresh_rows(batch)
        return fresh == 0 or self._size == 0 or self._size + fresh <= self.capacity

    def offer(self, batch: pa.RecordBatch) -> bool:
        """Add ``batch`` if there is room (stale rows are dropped and counted); False when full."""
        check_schema(batch.schema, where="batch put into the rollout buffer")
        if not self.can_put(batch):
            return False
        stale, original = self._stale_count(batch), batch
        if stale:
            batch = batch.filter(pc.greater_equal(batch.column("weight_version"), self.min_version))
            self.counters.stale_dropped += stale
            log.info("dropped %d stale rows (weights older than version %d)", stale, self.min_version)
        if batch.num_rows:
            self._queue.append(batch)
            self._size += batch.num_rows
        self._count_put(batch.num_rows + stale, original)
        self.counters.puts += 1
        self.counters.rows_in += batch.num_rows + stale
        return True

    def take(self, n: int) -> pa.RecordBatch | None:
        """Hand out (and forget) the oldest ``min(n, size)`` rows; None when empty. Spills them first."""
        if n <= 0:
            raise ValueError(f"get needs n > 0 rows, got {n}")
        if not self._size:
            return None
        parts, need = [], n
        while need and self._queue:
            head = self._queue.popleft()
            if head.num_rows > need:
                self._queue.appendleft(head.slice(need))
                head = head.slice(0, need)
            parts.append(head)
            need -= head.num_rows
        out = concat_batches(parts)
        self._size -= out.num_rows
        self._taken_at_version += out.num_rows
        self.counters.gets += 1
        self.counters.rows_out += out.num_rows
        if self._spill is not None:
            self.counters.spill_files += self._spill.write(out)
            self.counters.spilled_rows += out.num_rows
        return out

    def set_version(self, version: int) -> int:
        """The learner now holds ``version``: drop rows that became too stale; returns how many."""
        if version < self.version:
            raise ValueError(f"weight version went back from {self.version} to {version}; versions only grow")
        if version == self.version:
            return 0
        self.version, self._taken_at_version = version, 0
        dropped, kept = 0, deque()
        for batch in self._queue:
            stale = self._stale_count(batch)
            if stale:
                batch = batch.filter(pc.greater_equal(batch.column("weight_version"), self.min_version))
                dropped += stale
            if batch.num_rows:
                kept.append(batch)
        self._queue, self._size = kept, self._size - dropped
        self.counters.stale_dropped += dropped
        return dropped

    def budget(self, actor_version: int) -> int:
        """Rows an engine holding ``actor_version`` may still start generating (0 = wait or sync weights).

        Free capacity minus rows already permitted; with ``rows_per_version`` also at most the rows the
        learner will consume before its version passes ``actor_version + max_staleness``.
        """
        if actor_version < self.min_version:
            return 0
        supply = self._size + self._outstanding
        budget = self.capacity - supply
        if self.rows_per_version is not None:
            versions_usable = actor_version + self.max_staleness - self.version + 1
            demand = versions_usable * self.rows_per_version - self._taken_at_version
            budget = min(budget, demand - supply)
        return max(0, budget)

    @property
    def _outstanding(self) -> int:
        return sum(self._permits.values())

    def grant(self, n: int, actor_version: int, actor_id: str = "") -> int:
        """Permit up to ``n`` rows of generation at ``actor_version``; returns the rows permitted."""
        granted = min(n, self.budget(actor_version))
        self._permits[actor_id] = self._permits.get(actor_id, 0) + granted
        self.counters.permits_granted += granted
        return granted

    def release(self, n: int, actor_id: str = "") -> None:
        """Return permits that were not used (generation failed or was cut short)."""
        self._permits[actor_id] = max(0, self._permits.get(actor_id, 0) - n)

    def register(self, actor_id: str, actor_seq: int = 0) -> int:
        """A rollout actor (re)starts: its earlier permits are void; returns the seq of its next row.
        ``actor_seq``: the actor's own next seq; past the returned one, its rows are generated again."""
        # Permits of a previous life that never became a put: those rows died with it (same ids again).
        self.counters.lost_rows += self._permits.pop(actor_id, 0)
        seq = self._next_seq.get(actor_id, 0)
        self.counters.regenerated_rows += max(0, actor_seq - seq)
        return seq

    def restore(self, next_seq: dict[str, int], version: int, floor: bool = False) -> int:
        """Start over from the learner's row ids ``next_seq`` (per actor, the seq of the next row it expects):
        drop the rows held and void every permit (those rows are generated again, with the same ids); the
        learner holds ``version``; ``floor``: refuse rows of older weights from now on. Returns rows dropped.

        >>> from coordexp_rl.rollout.schema import RolloutRow, rows_to_batch
        >>> core = BufferCore(capacity=4)
        >>> core.offer(rows_to_batch([RolloutRow("a", actor_id="x", seq=s) for s in (3, 4)]))
        True
        >>> core.restore({"x": 3}, version=0), core.size, core.register("x", actor_seq=5)
        (2, 0, 3)
        """
        dropped = self._size
        self._queue, self._size, self._permits = deque(), 0, {}
        self._next_seq = dict(next_seq)
        self.version, self._taken_at_version = version, 0
        if floor:
            self._floor = version
        self.counters.restores += 1
        self.counters.restore_dropped += dropped
        return dropped

    def _count_put(self, rows: int, batch: pa.RecordBatch) -> None:
        """A put uses up its actor's permits and moves that actor's next seq past the batch."""
        actors = set(batch.column("actor_id").to_pylist()) if batch.num_rows else set()
        actor = actors.pop() if len(actors) == 1 else ""
        self._permits[actor] = max(0, self._permits.get(actor, 0) - rows)
        for a, seq in zip(batch.column("actor_id").to_pylist(), batch.column("seq").to_pylist()):
            self._next_seq[a] = max(self._next_seq.get(a, 0), seq + 1)

    def close(self) -> None:
        if self._spill is not None:
            self.counters.spill_files += self._spill.flush()

    def stats(self) -> dict:
        return {"size": self._size, "capacity": self.capacity, "version": self.version,
                "max_staleness": self.max_staleness, "outstanding_permits": self._outstanding,
                **asdict(self.counters)}

    def _stale_count(self, batch: pa.RecordBatch) -> int:
        if batch.num_rows == 0:
            return 0
        fresh = pc.sum(pc.greater_equal(batch.column("weight_version"), self.min_version)).as_py() or 0
        return batch.num_rows - fresh


class AsyncRolloutBuffer:
    """``BufferCore`` plus waiting: ``put`` and ``get`` await (with timeouts) instead of failing."""

    def __init__(self, capacity: int, max_staleness: int = 0, rows_per_version: int | None = None,
                 spill_dir: str | None = None, spill_rows_per_file: int = 0, version: int = 0,
                 next_seq: dict[str, int] | None = None):
        self.core = BufferCore(capacity, max_staleness, rows_per_version, spill_dir, spill_rows_per_file,
                               version, next_seq)
        self._changed = asyncio.Condition()  # notified on every change of size, version or permits
        self._interrupted = False
        self._woken = False  # wake(): the waiting (or next) get returns at once
        self._weights: tuple[int, list] = (0, [])  # the newest kept (version, [object ref]); [] = none
        # A restarted process serves nobody until restored (the learner's next get brings its row ids).
        self._restored = not _restarted_actor()
        self._members: set[str] | None = None if self._restored else set()  # registered since the restore
        self.incarnation = uuid.uuid4().hex[:12]  # changes when Ray restarts the buffer
        self._restores = 0  # a get waiting from before a restore returns None (its learner may be dead)

    async def put(self, batch: pa.RecordBatch, timeout_s: float | None = None) -> bool:
        """Add a batch, waiting while the buffer is full; False if still full after ``timeout_s``."""
        check_schema(batch.schema, where="batch put into the rollout buffer")
        start = time.monotonic()
        if not self._member(set(batch.column("actor_id").to_pylist())):
            self.core.counters.refused_rows += batch.num_rows  # its ids are the restore's to hand out now
            return False
        async with self._changed:
            ok = await self._wait(lambda: self.core.can_put(batch), timeout_s)
            self.core.counters.blocked_s += time.monotonic() - start
            if not ok:
                self.core.counters.put_timeouts += 1
                return False
            self.core.offer(batch)
            self._changed.notify_all()
            return True

    async def get(self, n: int, timeout_s: float | None = None, min_rows: int | None = None,
                  consumed: dict[str, int] | None = None, version: int = 0) -> pa.RecordBatch | None:
        """Up to ``n`` rows once at least ``min_rows`` (default ``n``) are there; None after ``timeout_s``.

        Every row is handed out exactly once. None means nothing was taken. ``consumed`` / ``version``: the
        learner's row ids (per actor, the next seq it expects) and weight version, which restore a
        restarted buffer.
        """
        need = n if min_rows is None else max(1, min(min_rows, n))
        start = time.monotonic()
        if not self._restored and consumed is not None:
            await self.restore(consumed, max(version, self.core.version))
            log.warning("restarted rollout buffer restored from the learner's row ids %s, version %d", consumed,
                        self.core.version)
        restores = self._restores
        async with self._changed:
            ok = await self._wait(lambda: self.core.size >= need or self._interrupted or self._woken
                                  or self._restores != restores, timeout_s)
            self.core.counters.get_wait_s += time.monotonic() - start
            self._woken = False
            if not ok or self._interrupted or self.core.size < need or self._restores != restores:
                return None
            out = self.core.take(n)
            self._changed.notify_all()
            return out

    async def acquire(self, n: int, actor_version: int, timeout_s: float = 0.0, actor_id: str = "") -> int:
        """Permits to generate up to ``n`` rows at ``actor_version``; waits up to ``timeout_s`` for any.

        0 means: not now (buffer full, or the learner cannot use more rows of this version) or, when
        ``actor_version < version() - max_staleness``, sync weights first.
        """
        if not self._member({actor_id}):
            return 0  # the actor registers again first (its permits and ids are void since the restore)
        async with self._changed:
            # A stale engine stops waiting at once: only a weight sync helps it.
            await self._wait(lambda: self.core.budget(actor_version) > 0
                             or actor_version < self.core.min_version, timeout_s)
            return self.core.grant(n, actor_version, actor_id)

    async def release(self, n: int, actor_id: str = "") -> None:
        async with self._changed:
            self.core.release(n, actor_id)
            self._changed.notify_all()

    async def register(self, actor_id: str, actor_seq: int = 0, timeout_s: float = 1.0) -> dict:
        """A (re)started actor: its next seq and the newest kept weights ``(version, [ref])``; next seq None
        while a restarted buffer waits ``timeout_s`` for its restore (the actor asks again later).
        ``actor_seq``: the actor's own next seq (rows past the buffer's are counted as generated again)."""
        async with self._changed:
            if not await self._wait(lambda: self._restored, timeout_s):
                return {"next_seq": None, "weights": self._weights}
            seq = self.core.register(actor_id, actor_seq)
            if self._members is not None:
                self._members.add(actor_id)
            self._changed.notify_all()
            return {"next_seq": seq, "weights": self._weights}

    async def restore(self, next_seq: dict[str, int], version: int, floor: bool = False) -> int:
        """``BufferCore.restore``; every actor must register again. Returns the rows dropped."""
        async with self._changed:
            dropped = self.core.restore(next_seq, version, floor)
            self._restored, self._members = True, set()
            self._restores += 1
            self._changed.notify_all()
            return dropped

    async def get_incarnation(self) -> str:
        """An id of this process: another one means Ray restarted the buffer."""
        return self.incarnation

    async def fail_now(self) -> None:
        """run.fail_at: this process dies at once, as in a crash (the driver decides when)."""
        os.kill(os.getpid(), signal.SIGKILL)

    def _member(self, actor_ids: set[str]) -> bool:
        """Whether the actors have registered since the last restore (always, when there was none)."""
        return self._members is None or actor_ids <= self._members

    async def keep_weights(self, version: int, refs: list) -> None:
        """Keep the newest weights (a list holding one object ref, so Ray passes the ref, not the value)."""
        if version >= self._weights[0]:
            self._weights = (version, list(refs))

    async def interrupt(self) -> None:
        """Wake a waiting ``get`` with None (the run is stopping); later gets return None at once."""
        async with self._changed:
            self._interrupted = True
            self._changed.notify_all()

    async def wake(self) -> None:
        """Let the learner's waiting (or next) ``get`` return now, with None unless its rows are there: the
        driver needs the learner for a moment (to leave weights for a restarted actor)."""
        async with self._changed:
            self._woken = True
            self._changed.notify_all()

    async def next_seq(self) -> dict[str, int]:
        return dict(self.core._next_seq)

    async def set_version(self, version: int) -> int:
        async with self._changed:
            dropped = self.core.set_version(version)
            self._changed.notify_all()
            return dropped

    async def stats(self) -> dict:
        return self.core.stats()

    async def close(self) -> dict:
        """Flush the spill files; returns the final stats."""
        self.core.close()
        return self.core.stats()

    async def _wait(self, predicate, timeout_s: float | None) -> bool:
        if predicate():
            return True
        if timeout_s is not None and timeout_s <= 0:
            return False
        try:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


def _restarted_actor() -> bool:
    """Whether this is a Ray actor's process that Ray restarted (False outside Ray)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    return ray.get_runtime_context().was_current_actor_reconstructed


# The Ray actor. num_cpus=0: it only moves batches, so it must not take a CPU slot from engines.
RolloutBuffer = ray.remote(num_cpus=0)(AsyncRolloutBuffer)
