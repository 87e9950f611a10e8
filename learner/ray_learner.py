"""The Learner as a Ray actor: owns the training data stream, pulls rollouts from the buffer, sends weights.

All training logic lives in `learner.learner.Learner`; this wrapper only adds where data comes from and
where weights go. Methods that hand back object refs say so in their name.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ray

from coordexp_rl.config import Config
from coordexp_rl.runtime import prepare_runtime

log = logging.getLogger(__name__)


class LearnerWorker:
    def __init__(self, cfg_dict: dict, model_path: str, train_path: str, image_root: str | None = None):
        prepare_runtime()
        from coordexp_rl.data.loader import load_samples
        from coordexp_rl.data.stream import BatchStream
        from learner.learner import Learner

        self.cfg = Config.model_validate(cfg_dict)
        self.learner = Learner(self.cfg, model_path)
        samples = load_samples(train_path, image_root or None, skip_bbox_norm=self.cfg.data.skip_bbox_norm)
        self.samples = {s.sample_id: s for s in samples}
        self.stream = BatchStream(samples, self.cfg.optim.batch_size, self.cfg.run.seed)

    def ready(self) -> dict:
        return {"step": self.learner.step, "version": self.learner.version, "samples": len(self.samples)}

    def stage1_steps(self, n: int) -> list[dict]:
        """``n`` Stage-1 steps on the next batches of the stream; their metrics."""
        return [self.learner.stage1_step(self.stream.next_batch()) for _ in range(n)]

    def stage2_step(self, buffer, timeout_s: float = 600.0) -> dict | None:
        """One Stage-2 step on the next batch of rollout rows; None if none came within ``timeout_s``."""
        from coordexp_rl.rollout_schema import batch_to_rows

        t0 = time.perf_counter()
        n = self.cfg.optim.batch_size
        batch = ray.get(buffer.get.remote(n, timeout_s, n))
        if batch is None:
            return None
        wait_s = time.perf_counter() - t0
        metrics = self.learner.stage2_step(batch_to_rows(batch), self.samples)
        metrics["buffer_wait_s"] = wait_s
        return metrics

    def publish_weights_ref(self, bucket_mb: int) -> tuple[int, ray.ObjectRef]:
        """A new weight version, packed into buckets and put into the object store once for all actors."""
        from coordexp_rl.weight_sync import ObjectStoreTransport

        version, named = self.learner.publish()
        payload = ObjectStoreTransport(bucket_bytes=bucket_mb << 20).send(version, named)
        return version, ray.put(payload)

    def save_checkpoint(self, path: str) -> str:
        return str(self.learner.save(Path(path), {"stream": self.stream.state()}))

    def load_checkpoint(self, path: str) -> dict:
        data = self.learner.load(Path(path))
        if "stream" in data:
            self.stream.load_state(data["stream"])
        return {"step": self.learner.step, "version": self.learner.version}

    def export(self, path: str) -> str:
        return str(self.learner.export_pretrained(Path(path)))


LearnerActor = ray.remote(LearnerWorker)
