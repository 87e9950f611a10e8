"""The Learner as a Ray actor: owns the training data stream, pulls rollouts from the buffer, sends weights.

All training logic lives in `learner.learner.Learner`; this wrapper only adds where data comes from and
where weights go. Methods that hand back object refs say so in their name.

One worker is one learner rank. With ``world_size > 1`` (see learner.group.LearnerGroup) every rank gets
the same calls: each keeps the same seeded data stream and trains on its share of each global batch;
rank 0 alone pulls Stage-2 rows from the buffer (one pull, then a broadcast to the other ranks, so a
timeout or an empty buffer is seen by all ranks at once and no rows are split between steps), and rank 0
alone returns the published weights.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from coordexp_rl.config import Config
from coordexp_rl.runtime import prepare_runtime

log = logging.getLogger(__name__)


class BufferGone(RuntimeError):
    """The rollout buffer's process died and Ray does not restart it (buffer.max_restarts used up)."""


def node_address() -> tuple[str, int]:
    """This node's IP and a TCP port free on it now (a rendezvous binds it moments later)."""
    from learner.distributed import free_port

    return ray.util.get_node_ip_address(), free_port()


class LearnerWorker:
    def __init__(self, cfg_dict: dict, model_path: str, train_path: str, image_root: str | None = None, *,
                 rank: int = 0, world_size: int = 1, master_addr: str = "", master_port: int = 0,
                 plan: dict | None = None, dist_timeout_s: float = 1800.0,
                 devices: tuple[str, int] | None = None):
        """``plan``: learner.distributed.ParallelPlan fields; ranks > 1 rendezvous at master_addr:port.
        ``devices``: (CUDA_VISIBLE_DEVICES, this rank's index in it), from ``group.share_node_gpus``."""
        prepare_runtime()
        self.devices = devices
        if devices is not None:  # before anything touches CUDA in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = devices[0]
        from coordexp_rl.data.limits import load_checked_samples
        from coordexp_rl.data.stream import BatchStream
        from learner.distributed import ParallelPlan, init_process_group
        from learner.learner import Learner

        self.cfg = Config.model_validate(cfg_dict)
        if world_size > 1:
            import torch

            init_process_group(rank, world_size, master_addr, master_port,
                               use_cuda=self.cfg.learner.gpus > 0 and torch.cuda.is_available(),
                               timeout_s=dist_timeout_s, local_device=devices[1] if devices else 0)
        self.learner = Learner(self.cfg, model_path, ParallelPlan(**(plan or {})))
        # The driver checked the images (or `validate` did): no rank re-opens them at start-up.
        samples, _ = load_checked_samples(self.cfg, train_path, image_root or None, self.learner.processor,
                                          check_images=False, train=True)
        self.samples = {s.sample_id: s for s in samples}
        self.stream = BatchStream(samples, self.cfg.optim.batch_size, self.cfg.run.seed)
        self.consumed: dict[str, int] = {}  # per rollout actor: the seq of the next row expected from it
        self.resumed: dict = {}  # the data state of the checkpoint loaded last
        self._broadcast = None  # a BroadcastTransport once the learner joins a weight group (rank 0)
        self._frozen_ref = None  # the frozen parameters' payload (object store; rank 0), built at the first sync
        self._frozen_published = False
        self._group_has_frozen = False  # broadcast: the current weight group got the frozen parameters

    def status(self) -> dict:
        """Where the learner stands (its first answer also tells the driver the actor is up)."""
        return {"step": self.learner.step, "version": self.learner.version, "samples": len(self.samples),
                "rank": self.learner.dist.rank, "world_size": self.learner.dist.world_size,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "local_device": self.devices[1] if self.devices else None}

    def stage1_steps(self, n: int) -> list[dict]:
        """``n`` Stage-1 steps on the next batches of the stream; their metrics."""
        return self.learner.stage1_steps(self.stream.next_batch, n)

    def teacher_forced_ious(self, val_path: str, image_root: str | None, n: int) -> list[list[float]]:
        """Exposure bias (coordexp_rl/evaluation/exposure.py): the teacher-forced IoUs of the GT boxes of
        ``val_path``'s first ``n`` samples (per sample, canonical order), on the current weights; every rank
        takes part (its share of the forwards) and returns the whole result. The driver checked the images."""
        from coordexp_rl.data.limits import load_checked_samples

        samples, _ = load_checked_samples(self.cfg, val_path, image_root or None, self.learner.processor,
                                          check_images=False, train=False)
        plan = self.learner.plan
        # the training micro-batch: what a rank's memory is known to hold (and a no-grad forward takes less)
        batch_size = max(1, self.cfg.optim.batch_size // (self.learner.dist.world_size * plan.accum_steps))
        return self.learner.teacher_forced_ious(samples[:n], batch_size)

    def stage2_step_from_buffer(self, buffer, timeout_s: float = 600.0) -> dict | None:
        """One Stage-2 step on the next batch of rollout rows; None if none came within ``timeout_s``."""
        from coordexp_rl.rollout.schema import batch_to_rows

        t0 = time.perf_counter()
        n = self.cfg.optim.batch_size
        dist = self.learner.dist
        rows = None
        if dist.is_main:
            batch = self._get_rows(buffer, n, timeout_s)
            rows = None if batch is None else batch_to_rows(batch)
        rows = dist.broadcast(rows)  # the whole global batch; each rank trains on its share
        if rows is None:
            return None
        wait_s = time.perf_counter() - t0
        ids = self._check_row_ids(rows)
        if self.cfg.stage2.reproducible:
            self._check_on_policy(rows, ids)
        metrics = self.learner.stage2_step(rows, self.samples)
        metrics.update(buffer_wait_s=wait_s, **ids)
        return metrics

    def _get_rows(self, buffer, n: int, timeout_s: float):
        """``n`` rows from the buffer (None after ``timeout_s``). A buffer that Ray is restarting is waited
        for, and restored by this get from the learner's row ids; one dead for good raises BufferGone."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(buffer.get.remote(n, max(0.0, deadline - time.monotonic()), n, self.consumed,
                                                 self.learner.version))
            except ActorUnavailableError:  # restarting: calls fail fast until it is back
                if time.monotonic() > deadline:
                    return None
                log.warning("the rollout buffer is restarting; the learner waits for it")
                time.sleep(1.0)
            except RayActorError as exc:
                raise BufferGone(f"the rollout buffer died and is not restarted (buffer.max_restarts used up): "
                                 f"{type(exc).__name__}") from None

    def _check_on_policy(self, rows, ids: dict) -> None:
        """stage2.reproducible promises that every batch is the actor's next rows, generated with the learner's
        current weights; a batch that is not (a skipped or repeated row, an older version) stops the run."""
        versions = sorted({r.weight_version for r in rows})
        if ids["rows/duplicate_ids"] or ids["rows/skipped_ids"] or versions != [self.learner.version]:
            raise RuntimeError(f"stage2.reproducible: the learner at weight version {self.learner.version} got rows "
                               f"[actor, seq, version] {ids['rows/ids']} (duplicates {ids['rows/duplicate_ids']}, "
                               f"skipped {ids['rows/skipped_ids']}): not the actor's next rows on the current weights")

    def _check_row_ids(self, rows) -> dict:
        """Each actor's rows arrive in seq order (FIFO): a seq below the expected one was consumed before
        (a duplicate), one above means rows were skipped (e.g. dropped as stale). Counted, and logged."""
        dup = skipped = 0
        for r in rows:
            expected = self.consumed.get(r.actor_id, 0)
            if r.seq < expected:
                dup += 1
                log.error("row (%s, %d) consumed twice (expected seq %d)", r.actor_id, r.seq, expected)
            skipped += max(0, r.seq - expected)
            self.consumed[r.actor_id] = max(expected, r.seq + 1)
        return {"rows/duplicate_ids": dup, "rows/skipped_ids": skipped,
                "rows/ids": [[r.actor_id, r.seq, r.weight_version] for r in rows]}

    def put_weights(self, bucket_mb: int, bump: bool = True
                            ) -> tuple[int, ray.ObjectRef | None, ray.ObjectRef | None]:
        """A new weight version in the engines' dtype, bucket by bucket into the object store (one bucket
        held here at a time): ``(version, payload ref, frozen ref)``. The payload leaves out frozen
        parameters (declared in it); ``frozen ref`` is a payload of only those, built once per learner life
        (they never change) for actors that have not loaded them since their start; None when none.
        ``bump=False`` re-publishes the current version (a resumed run whose checkpoint was taken right
        after a sync, or a restarted actor on the broadcast transport).

        Sharded: tensors are gathered one by one while rank 0 packs them (other ranks only take part in the
        gathers and return (version, None, None)).
        """
        version = self.learner.new_version() if bump else self.learner.version
        frozen = self.learner.frozen_names()
        if frozen and not self._frozen_published:  # decided alike on every rank: the gathers are collectives
            self._frozen_ref = self._put_payload(version, self.learner.named_weights(frozen=True), (), bucket_mb)
            self._frozen_published = True
        payload = self._put_payload(version, self.learner.named_weights(frozen=False if frozen else None),
                                    frozen, bucket_mb)
        return version, payload, self._frozen_ref

    def _put_payload(self, version: int, named, omitted, bucket_mb: int) -> ray.ObjectRef | None:
        from coordexp_rl.rollout.weight_transport import ObjectStoreTransport

        if not self._main_packs(named):
            return None
        payload = ObjectStoreTransport(bucket_bytes=bucket_mb << 20).send(
            version, named, dtype=self.cfg.model.dtype, omitted=omitted, put=ray.put)
        return ray.put(payload)

    def _main_packs(self, named) -> bool:
        """True on rank 0, which packs ``named``; ranks > 0 only run its gathers (collectives when sharded)."""
        if self.learner.dist.is_main:
            return True
        for _ in named:
            pass
        return False

    # --- the `broadcast` weight transport: rank 0 of the learner is rank 0 of the weight group ----------

    def weight_group_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it, for the weight group's rendezvous."""
        return node_address()

    def join_weight_group(self, master_addr: str, port: int, rank: int, world_size: int, backend: str,
                          timeout_s: float) -> int:
        from coordexp_rl.rollout.weight_transport import BroadcastTransport, init_weight_group

        if self.learner.dist.is_main:
            self._broadcast = BroadcastTransport(init_weight_group(master_addr, port, rank, world_size, backend,
                                                                   timeout_s))
        self._group_has_frozen = False  # a new group has (re)started actors: send frozen tensors once
        return rank

    def broadcast_weights(self, bucket_mb: int, bump: bool = True) -> int:
        """A new weight version in the engines' dtype, broadcast bucket by bucket to every rollout actor
        (gathered when sharded); frozen parameters only in the first broadcast of a new group."""
        version = self.learner.new_version() if bump else self.learner.version
        frozen = [] if not self._group_has_frozen else self.learner.frozen_names()
        named = self.learner.named_weights(frozen=False if frozen else None)
        self._group_has_frozen = True
        if not self._main_packs(named):
            return version
        self._broadcast.bucket_bytes = bucket_mb << 20
        self._broadcast.send(version, named, dtype=self.cfg.model.dtype, omitted=frozen)
        return version

    def save_checkpoint(self, path: str, keep_last: int = 0, driver: dict | None = None,
                        protect: list[str] | None = None) -> str:
        """Save (data stream, consumed row ids and the driver's own state go along); keep the newest
        ``keep_last`` complete checkpoints of the folder (0 = all) and those in ``protect``."""
        from learner.checkpoint import prune_checkpoints

        data = {"stream": self.stream.state(), "consumed": dict(self.consumed), "driver": driver or {}}
        out = self.learner.save(Path(path), data)
        if self.learner.dist.is_main and keep_last:
            prune_checkpoints(Path(path).parent, keep_last, protect=protect or ())
        return str(out)

    def latest_checkpoint(self, folder: str) -> str | None:
        """The newest complete checkpoint in ``folder`` (incomplete ones are skipped with a message)."""
        from learner.checkpoint import latest_checkpoint

        found = latest_checkpoint(Path(folder))
        return str(found) if found else None

    def load_checkpoint(self, path: str) -> dict:
        data = self.learner.load(Path(path))
        if "stream" in data:
            self.stream.load_state(data["stream"])
        self.consumed = dict(data.get("consumed", {}))
        self.resumed = data
        return {"step": self.learner.step, "version": self.learner.version}

    def resumed_state(self) -> dict:
        """What the last loaded checkpoint carried besides the learner: consumed row ids, driver state."""
        return {"consumed": self.resumed.get("consumed", {}), "driver": self.resumed.get("driver", {})}

    def export(self, path: str) -> str:
        return str(self.learner.export_pretrained(Path(path)))

    def continue_versions(self, version: int) -> int:
        """After a restart from a checkpoint: the next published version follows ``version`` (the newest
        the lost learner published), so weight versions only grow and rows of lost weights stay apart."""
        self.learner.version = max(self.learner.version, version)
        return self.learner.version

    def fail_now(self) -> None:
        """run.fail_at: this process dies at once, as in a crash (the driver decides when)."""
        os.kill(os.getpid(), signal.SIGKILL)


LearnerActor = ray.remote(LearnerWorker)
