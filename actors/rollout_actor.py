"""The rollout actor: owns one engine, generates for its shard of the data, parses, pushes Arrow rows.

``RolloutWorker`` is the plain class (usable in one process, tested without Ray); ``RolloutActor`` is
the same class as a Ray actor. Work items are ``(sample_id, image_path, image_rel)``; actor ``k`` of
``n`` takes every n-th item starting at ``k`` (``shard``) and cycles through its shard forever, each item
``per_image`` times in a row (several hypotheses per image; they differ only when sampling).

Flow per batch: (optionally) ask the buffer for permits -> load images -> ``engine.generate`` ->
``parse_ids`` on the actor -> ``rows_to_batch`` -> ``buffer.put``. Every row carries the engine's
weight version, so the buffer can enforce staleness, and the id ``(actor_id, seq)``: the actor's row
counter, whose item is ``shard[(seq // per_image) % len(shard)]``.

Faults: the actor is restarted by Ray when its process dies (``max_restarts``). Before it generates
again (first ``step`` or ``predict`` of each life) it registers with the buffer, which voids the permits
of its earlier life and tells it the seq after the last row it put (rows generated but never put are
simply generated again, with the same ids), and it loads the newest weights the learner published. When
the buffer itself dies, a call to it fails (Ray is restarting it): the step's rows are lost, and the
actor registers again with the restored buffer, which tells it where the row ids go on.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError

from actors.engines import make_engine
from coordexp_rl.data.loader import load_rgb
from coordexp_rl.rollout.engine import EngineConfig, GenerationRequest, GenerationResult, SamplingConfig
from coordexp_rl.runtime import prepare_runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    sample_id: str
    image_path: str  # absolute, readable on the actor's node
    image_rel: str  # as written in the data file (goes into the row)


def shard(items: Sequence, num_shards: int, index: int) -> list:
    """Every ``num_shards``-th item starting at ``index``: ``shard(range(5), 2, 1) == [1, 3]``."""
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} is outside 0..{num_shards - 1}")
    return list(items[index::num_shards])


@dataclass
class ThroughputCounters:
    images: int = 0
    generated_tokens: int = 0
    valid_objects: int = 0  # parsed objects that passed the protocol checks
    seconds: float = 0.0  # wall time inside generate + parse

    def as_dict(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {"images": self.images, "generated_tokens": self.generated_tokens,
                "valid_objects": self.valid_objects, "seconds": self.seconds,
                "images_per_s": self.images / s, "tokens_per_s": self.generated_tokens / s,
                "objects_per_s": self.valid_objects / s}


class RolloutWorker:
    """One engine plus its shard of work items."""

    def __init__(self, engine_config: EngineConfig, items: Sequence[tuple[str, str, str]], prompt_text: str,
                 sampling: SamplingConfig, batch_size: int = 8, actor_id: str = "rollout-0",
                 num_shards: int = 1, shard_index: int = 0, buffer=None, put_timeout_s: float = 60.0,
                 per_image: int = 1):
        prepare_runtime()
        from coordexp_rl.method.coords import CoordVocab

        self.items = [WorkItem(*it) for it in shard(list(items), num_shards, shard_index)]
        if not self.items:
            raise ValueError(f"actor {actor_id}: shard {shard_index}/{num_shards} of {len(items)} items is empty")
        self.engine = make_engine(engine_config)
        self.tokenizer = self.engine.processor.tokenizer
        self.vocab = CoordVocab.from_tokenizer(self.tokenizer)
        self.prompt_text, self.sampling, self.batch_size = prompt_text, sampling, batch_size
        self.per_image = per_image
        self.actor_id, self.buffer, self.put_timeout_s = actor_id, buffer, put_timeout_s
        self.counters = ThroughputCounters()
        self._seq = 0  # the seq of the next row (and the shard position: (seq // per_image) % len(items))
        self._registered = buffer is None  # registers with the buffer before it first generates
        self._announced = False
        self._has_frozen = False  # frozen parameters loaded from the learner since this (re)start
        self._sha: dict[str, str] = {}
        self._broadcast = None  # the weight group's receiver; None until join_weight_group (in each life)

    # --- generation ---------------------------------------------------------------------------------

    def item(self, seq: int) -> WorkItem:
        """The work item of row ``seq``."""
        return self.items[(seq // self.per_image) % len(self.items)]

    def next_items(self, n: int) -> list[tuple[int, WorkItem]]:
        """The next ``n`` (seq, item) pairs; the seq counter moves past them."""
        out = [(self._seq + i, self.item(self._seq + i)) for i in range(n)]
        self._seq += n
        return out

    def generate_rows(self, n: int | None = None):
        """Generate and parse the next ``n`` (default batch_size) items -> list of RolloutRow."""
        from coordexp_rl.data.loader import image_sha256

        start = self._seq
        items = self.next_items(n or self.batch_size)
        try:
            requests = [GenerationRequest(load_rgb(it.image_path), self.prompt_text, it.sample_id) for _, it in items]
            t0 = time.perf_counter()
            results = self.engine.generate(requests, self.sampling)
        except Exception:
            self._seq = start  # nothing was produced: the same ids go to the next try
            raise
        t_gen = (time.perf_counter() - t0) / len(items)
        rows = []
        for (seq, item), res in zip(items, results):
            sha = self._sha.get(item.image_path) or self._sha.setdefault(item.image_path, image_sha256(item.image_path))
            rows.append(self._row(item, res, sha, t_gen, seq))
        self.counters.images += len(rows)
        self.counters.generated_tokens += sum(len(r.generated_ids) for r in rows)
        self.counters.valid_objects += sum(len(r.objects) for r in rows)
        self.counters.seconds += time.perf_counter() - t0
        return rows

    def _row(self, item: WorkItem, res: GenerationResult, sha: str, t_gen: float, seq: int):
        from coordexp_rl.method.protocol import parse_ids
        from coordexp_rl.rollout.schema import RolloutRow

        t0 = time.perf_counter()
        parsed = parse_ids(res.generated_ids, self.tokenizer, self.vocab)
        return RolloutRow(
            sample_id=item.sample_id, image_rel=item.image_rel, image_sha256=sha, prompt_ids=res.prompt_ids,
            generated_ids=res.generated_ids, logprobs=res.logprobs, objects=parsed.objects,
            parse_status=parsed.status, parse_reasons=parsed.reasons, stray_tokens=parsed.stray_tokens,
            finish_reason=res.finish_reason, weight_version=res.weight_version, engine=self.engine.name,
            actor_id=self.actor_id, t_generate_s=t_gen, t_parse_s=time.perf_counter() - t0, created_at=time.time(),
            seq=seq,
        )

    def generate_batch(self, n: int | None = None) -> pa.RecordBatch:
        from coordexp_rl.rollout.schema import rows_to_batch

        return rows_to_batch(self.generate_rows(n))

    # --- pushing to the buffer -----------------------------------------------------------------------

    def step(self, permit_timeout_s: float = 1.0) -> int:
        """Ask the buffer for permits, generate that many rows, put them; returns rows put (0 = not now)."""
        if self.buffer is None:
            raise RuntimeError(f"actor {self.actor_id}: no buffer given; use generate_batch() instead")
        start = self._seq
        try:
            return self._step(permit_timeout_s)
        except RayActorError as exc:  # the buffer's process died (ActorUnavailableError while Ray restarts it)
            log.warning("actor %s: the rollout buffer is gone (%s); registering again once it is back",
                        self.actor_id, type(exc).__name__)
            self._seq, self._registered = start, False
            time.sleep(permit_timeout_s)  # the supervisor calls again at once
            return 0

    def _step(self, permit_timeout_s: float) -> int:
        if self.register() is None:
            return 0  # a restarted buffer not restored yet
        granted = ray.get(self.buffer.acquire.remote(self.batch_size, self.weight_version(), permit_timeout_s,
                                                     self.actor_id))
        if granted == 0:
            self._registered = False  # no permits held now: look again for newer kept weights next step
            return 0
        try:
            batch = self.generate_batch(granted)
        except Exception:
            ray.get(self.buffer.release.remote(granted, self.actor_id))
            raise
        t0 = time.monotonic()
        if not ray.get(self.buffer.put.remote(batch, self.put_timeout_s)):
            ray.get(self.buffer.release.remote(granted, self.actor_id))
            self._seq -= batch.num_rows  # never put: these ids are generated again
            self._registered = False  # a restored buffer refuses rows until the actor registers again
            why = (f"buffer stayed full for {self.put_timeout_s:.0f} s" if time.monotonic() - t0 >= self.put_timeout_s
                   else "buffer restored since this actor registered")
            log.warning("actor %s: %s; %d rows dropped", self.actor_id, why, batch.num_rows)
            return 0
        return batch.num_rows

    def run(self, max_rows: int, permit_timeout_s: float = 1.0, deadline_s: float | None = None) -> int:
        """Loop ``step`` until ``max_rows`` rows were put or ``deadline_s`` seconds passed; rows put."""
        start, done = time.monotonic(), 0
        while done < max_rows and (deadline_s is None or time.monotonic() - start < deadline_s):
            done += self.step(permit_timeout_s)
        return done

    def register(self) -> int | None:
        """Once per life (and after a buffer restore): void earlier permits, continue the row ids, load the
        newest kept weights. None: a restarted buffer is not restored yet."""
        if self._registered:
            return self._seq
        info = ray.get(self.buffer.register.remote(self.actor_id, self._seq))
        if info["next_seq"] is None:
            return None
        self._seq = info["next_seq"]
        version, refs = info["weights"]
        if refs and version > self.weight_version():
            self.update_weights(ray.get(refs[0]), refs[1:])
        self._registered = True
        if self._announced:
            return self._seq
        self._announced = True
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        log.log(logging.WARNING if restarted else logging.INFO, "actor %s %s: next row seq %d, weight version %d",
                self.actor_id, "restarted" if restarted else "registered", self._seq, self.weight_version())
        return self._seq

    def reset_caches(self) -> None:
        """The engine forgets earlier requests' work, so a timed call does not reuse another's (bench)."""
        self.engine.reset_caches()

    def time_generate(self, n: int | None = None) -> float:
        """Seconds of the bare ``engine.generate`` on the next ``n`` items (not used up): the baseline that
        ``bench rollout`` compares ``step`` with (images are loaded before the clock starts)."""
        items = [self.item(self._seq + i) for i in range(n or self.batch_size)]
        requests = [GenerationRequest(load_rgb(it.image_path), self.prompt_text, it.sample_id) for it in items]
        t0 = time.perf_counter()
        self.engine.generate(requests, self.sampling)
        return time.perf_counter() - t0

    # --- weights and health --------------------------------------------------------------------------

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                     omitted: Sequence[str] = ()) -> int:
        self.engine.load_weights(named_tensors, version, omitted)
        return self.engine.weight_version

    def update_weights(self, payload, frozen_refs: Sequence = ()) -> int:
        """The one control call of a sync: fetch the learner's buckets (a WeightPayload) and load them.

        ``frozen_refs``: [ref to the frozen-parameter payload] (nested in a list, so Ray does not fetch
        it; or the payload itself in-process): fetched only on this actor's first load since its
        (re)start, when the payload omits them.
        """
        from coordexp_rl.rollout.weight_transport import ObjectStoreTransport

        transport = ObjectStoreTransport()
        version, named, omitted = transport.receive(payload, get=_get_all)
        if omitted and frozen_refs and not self._has_frozen:
            _, frozen, _ = transport.receive(_get_all(frozen_refs[:1])[0], get=_get_all)
            named, omitted = named + frozen, ()
        loaded = self.load_weights(named, version, omitted)
        self._has_frozen = self._has_frozen or not omitted
        return loaded

    def join_weight_group(self, master_addr: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        """Join the learner's broadcast group (the `broadcast` weight transport); returns this rank."""
        from coordexp_rl.rollout.weight_transport import BroadcastTransport, init_weight_group

        self._broadcast = BroadcastTransport(init_weight_group(master_addr, port, rank, world_size, backend,
                                                               timeout_s))
        return rank

    def receive_broadcast_weights(self) -> int:
        """The one control call of a broadcast sync: receive every bucket, then load (never half-loaded)."""
        from coordexp_rl.rollout.weight_transport import WeightSyncError

        if self._broadcast is None:  # a restarted process: the driver re-forms the group at the next sync
            raise WeightSyncError(f"actor {self.actor_id} is in no weight group (restarted since it formed?)")
        version, named, omitted = self._broadcast.receive()
        return self.load_weights(named, version, omitted)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def predict(self, samples: Sequence, max_new_tokens: int | None = None) -> list[dict]:
        """Greedy prediction records (coordexp_rl.rollout.predict) for evaluation with the current weights."""
        from coordexp_rl.rollout.predict import predict

        if self.buffer is not None:
            self.register()  # a restarted actor evaluates with the newest weights, not its initial ones
        return list(predict(self.engine, list(samples), self.prompt_text, batch_size=self.batch_size,
                            max_new_tokens=max_new_tokens or self.sampling.max_new_tokens))

    def stats(self) -> dict:
        return {"actor_id": self.actor_id, "engine": self.engine.name, "weight_version": self.weight_version(),
                "shard_size": len(self.items), "next_seq": self._seq, **self.counters.as_dict()}

    def close(self) -> None:
        self.engine.close()

    def fail_now(self) -> None:
        """run.fail_at: this process dies at once, as in a crash (the driver decides when)."""
        os.kill(os.getpid(), signal.SIGKILL)


def _get_all(items: list) -> list:
    """Bucket refs (what the learner put) or buckets themselves (in-process callers)."""
    return [ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in items]


RolloutActor = ray.remote(RolloutWorker)
