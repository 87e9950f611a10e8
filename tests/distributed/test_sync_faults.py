"""Weight syncs and evaluations that lose a rollout actor (real Ray, SIGKILL; gloo broadcast on CPU).

The broadcast test runs the real learner and two real rollout actors (transformers engine, tiny model):
one dies mid-transfer (after the header, before the buckets). The other ends on the new version, the
buffer's version moves on, the dead one (restarted by Ray) gets the weights through the object store,
and the next sync re-forms the group with both. An actor killed between syncs loads the current
weights when it registers. Without the fallback and the re-formed group the restarted actor would stay
on old weights and every later broadcast would fail.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from actors.rollout_actor import RolloutWorker
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
from tests.actors.conftest import PROMPT

pytestmark = pytest.mark.integration


def call_when_back(method, timeout_s: float = 300.0):
    """``ray.get(method.remote())``, again every second while Ray restarts the actor."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(method.remote())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DiesMidTransfer(RolloutWorker):
    """A rollout actor that, while ``marker`` exists, receives a broadcast's header and then dies
    (once: it removes the marker first, so the restarted process behaves)."""

    def __init__(self, *args, marker: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker

    def receive_broadcast_weights(self) -> int:
        if self.marker and os.path.exists(self.marker) and self._broadcast is not None:
            os.remove(self.marker)
            self._broadcast.group.broadcast(torch.zeros(1, dtype=torch.int64), "header length")
            _sigkill_self()
        return super().receive_broadcast_weights()

    def pid(self) -> int:
        return os.getpid()


class Predictor:
    """Stands in for a rollout actor in an evaluation; dies on its first predict while ``marker`` exists."""

    def __init__(self, marker: str = ""):
        self.marker = marker

    def predict(self, samples: list) -> list[dict]:
        if self.marker and os.path.exists(self.marker):
            os.remove(self.marker)
            _sigkill_self()
        return [{"sample_id": s, "pid": os.getpid()} for s in samples]

    def pid(self) -> int:
        return os.getpid()


def test_broadcast_sync_survives_an_actor_dying_mid_transfer(ray_local, tiny_model_dir, synth_dir, tmp_path):
    from actors.buffer import RolloutBuffer
    from coordexp_rl.driver.weight_sync import WeightSyncer
    from learner.group import LearnerGroup

    train = synth_dir / "train.jsonl"
    items = [(s.sample_id, str(s.image_path), s.image_rel) for s in load_samples(train)[:4]]
    learner = LearnerGroup(load_config(None, ["optim.batch_size=2"]).model_dump(), str(tiny_model_dir), str(train),
                           num_cpus=0)
    buffer = RolloutBuffer.remote(capacity=8, max_staleness=0)
    marker = tmp_path / "die"
    actor_cls = ray.remote(DiesMidTransfer)
    actors = [actor_cls.options(num_cpus=0, max_restarts=2).remote(
        EngineConfig(str(tiny_model_dir), kind="hf"), items, PROMPT, SamplingConfig(max_new_tokens=4), batch_size=1,
        actor_id=f"rollout-{i}", num_shards=2, shard_index=i, buffer=buffer, marker=str(marker) if i else "")
        for i in range(2)]
    versions = lambda: ray.get([a.weight_version.remote() for a in actors])  # noqa: E731
    # rollout-0 waits this long for the buckets that never come when rollout-1 dies mid-transfer, and the
    # restarted rollout-1 has this long to come up for the object store (8 s was too short on a loaded machine)
    syncer = WeightSyncer(learner, actors, buffer, "broadcast", bucket_mb=1, timeout_s=15)
    assert syncer.form_group(strict=True)

    first = syncer.sync()
    assert (first.version, first.via, first.failed, first.gone) == (1, {0: "broadcast", 1: "broadcast"}, {}, set())
    assert syncer.restarts_lack_weights  # broadcast: the buffer holds no weights of v1 (none left there yet)

    marker.touch()
    old_pid = ray.get(actors[1].pid.remote())
    second = syncer.sync()  # rollout-1 dies after the header
    assert not marker.exists() and second.version == 2 and not second.failed
    assert second.gone == {1}  # reached by the fallback, yet reported dead: the supervisor counts the death
    assert second.via[1] == "object_store"  # the restarted process, through the object store
    assert second.via[0] in ("broadcast", "object_store")  # gloo may or may not finish the others' broadcast
    assert versions() == [2, 2] and ray.get(actors[1].pid.remote()) != old_pid
    assert ray.get(buffer.stats.remote())["version"] == 2
    assert ray.get(buffer.acquire.remote(1, 1, 0.0, "old")) == 0  # admission: v1 rows are stale now

    third = syncer.sync()  # the group re-formed with both
    assert (third.version, third.via, third.failed, third.gone) == (3, {0: "broadcast", 1: "broadcast"}, {}, set())
    assert versions() == [3, 3]

    # Killed between syncs: the driver leaves the weights in the buffer; the new process loads them first.
    assert syncer.restarts_lack_weights
    os.kill(ray.get(actors[1].pid.remote()), signal.SIGKILL)
    syncer.keep_weights_for_restarts()
    assert not syncer.restarts_lack_weights
    call_when_back(actors[1].register)  # the new process's first call (the supervisor retries likewise)
    assert versions() == [3, 3]
    fourth = syncer.sync()
    assert (fourth.version, fourth.via) == (4, {0: "broadcast", 1: "broadcast"})
    learner.kill()


@pytest.mark.parametrize("restarts", [1, 0])
def test_an_evaluation_survives_a_dying_actor(ray_local, tmp_path, restarts):
    """Restarted: the shard runs again on the new process. No restarts left: another actor takes it."""
    from coordexp_rl.driver.supervisor import predict_all

    marker = tmp_path / "die"
    marker.touch()
    predictor = ray.remote(Predictor)
    actors = [predictor.options(num_cpus=0, max_restarts=restarts).remote(str(marker) if i else "")
              for i in range(2)]
    pid0 = ray.get(actors[0].pid.remote())
    gone = []
    preds = predict_all(actors, [["a", "c"], ["b", "d"]], on_gone=lambda: gone.append(1))
    assert sorted(p["sample_id"] for p in preds) == ["a", "b", "c", "d"] and gone == [1]
    by_id = {p["sample_id"]: p["pid"] for p in preds}
    assert (by_id["b"] == pid0) == (restarts == 0)
    for a in actors:
        ray.kill(a)
