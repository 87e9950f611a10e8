"""Stage-2's fault handling, all of it: keep every rollout actor busy and survive the ones that die.

Runs in the driver. Each actor has one ``step`` call queued at all times; when it returns, the next is
queued. An actor whose process died (SIGKILL, the OOM killer or Ray's memory monitor, a lost node) makes
its call fail with an actor error: it is marked down and called again after ``retry_s``. Ray restarts it
(``max_restarts``), and calls queued meanwhile run in the new process, which registers with the buffer and
loads the newest weights first (see actors/rollout_actor.py). Its first successful call marks it up again.
An actor that raises from its own code (a bug, a bad row) is not a death: that error reaches the caller.

``learner_step(learner)`` runs one Stage-2 learner step under that watch: after a death it leaves the
learner's current weights in the buffer for the restarted actor (``WeightSyncer.keep_weights_for_restarts``);
a learner blocked on rows that only the dead actor could bring is woken first, and its step runs again;
when every actor has been down for more than ``gone_timeout_s`` it raises ``ActorsGone`` (then nobody
fills the buffer: stop, do not hang). Deaths a weight sync saw reach it through ``record_sync``. A buffer
that Ray restarted (the learner's get restored it, actors/buffer.py) is seen after the step: the weights
for restarted actors are left in it again.
``predict_all`` is the evaluation's counterpart (a dead actor's share runs again).

>>> sup = RolloutSupervisor(actors, gone_timeout_s=300, buffer=buffer, syncer=syncer)  # doctest: +SKIP
>>> sup.start(); metrics = sup.learner_step(learner)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time

import ray
from ray.exceptions import ActorUnavailableError, OutOfMemoryError, RayActorError

from learner.ray_learner import BufferGone

log = logging.getLogger(__name__)

# RayActorError covers ActorDiedError; OutOfMemoryError: Ray's memory monitor killed the actor's process
# in the middle of the call (Ray restarts it like any other death).
ACTOR_GONE = (RayActorError, ActorUnavailableError, OutOfMemoryError)


class ActorsGone(RuntimeError):
    """Every rollout actor has been gone longer than ``rollout.gone_timeout_s``."""


class RolloutSupervisor:
    def __init__(self, actors: list, gone_timeout_s: float, *, buffer=None, syncer=None, max_restarts: int = 0,
                 retry_s: float = 1.0, clock=time.monotonic):
        """``buffer`` / ``syncer``: the run's (``learner_step`` needs them); ``max_restarts``: for messages."""
        self.actors, self.gone_timeout_s, self.retry_s, self.clock = actors, gone_timeout_s, retry_s, clock
        self.buffer, self.syncer, self.max_restarts = buffer, syncer, max_restarts
        self.pending: dict[ray.ObjectRef, int] = {}
        self.stale: set[ray.ObjectRef] = set()  # calls queued before their actor's death was seen
        self.down: dict[int, float] = {}  # actor index -> when its last call failed
        self.last_up = clock()  # the last time any actor was known to be up
        self.deaths = 0  # times an actor was seen gone (up -> down)
        self.failed_calls = 0  # calls that failed because their actor was gone (retries while it restarts too)
        self.failed_calls_answered = 0  # failed calls after which the weights were left for restarts
        self.learner_woken = False  # the learner's wait for rows was cut short to answer a death
        self.recoveries = 0  # actors that came back after being down
        self.rows = 0  # rows put by all actors' steps
        self.buffer_restarts = 0  # times the buffer's process was seen restarted
        self.buffer_incarnation = None  # the buffer process's id when last seen (after the first step)

    def start(self) -> None:
        for i in range(len(self.actors)):
            self._submit(i)

    def _submit(self, i: int) -> None:
        self.pending[self.actors[i].step.remote()] = i

    def learner_step(self, learner, timeout_s: float = 600.0) -> dict:
        """One Stage-2 step of ``learner`` (a LearnerGroup) on the buffer's rows while the actors are kept
        busy; after a death, the weights wait in the buffer for the restarted actor. Raises ActorsGone."""
        while True:
            step_ref = learner.stage2_step_from_buffer.remote(self.buffer, timeout_s)
            if not self.wait_for(step_ref):
                ray.get(self.buffer.interrupt.remote())  # the learner's blocked get returns None
                ray.get(step_ref)
                raise ActorsGone(self.gone_message())
            metrics = ray.get(step_ref)
            if self.failed_calls > self.failed_calls_answered:  # a death, or a restart still under way
                self.failed_calls_answered = self.failed_calls
                self.syncer.keep_weights_for_restarts()
            self._check_buffer()
            if metrics is not None:
                return metrics
            if not self.learner_woken:
                raise RuntimeError(f"stage-2: no rollouts arrived within {timeout_s:g} s; actor stats "
                                   f"{rollout_stats(self.actors, self.buffer)['actors']}")
            self.learner_woken = False  # woken by _wake_learner: the step again, now that the weights are there

    def _check_buffer(self) -> None:
        """A restarted buffer lost the weights kept for restarted actors: leave them there again."""
        try:
            incarnation = call_restarting(self.buffer.get_incarnation.remote)
        except RayActorError as exc:  # ActorDiedError: buffer.max_restarts used up
            raise BufferGone(f"the rollout buffer died and is not restarted (buffer.max_restarts used up): "
                             f"{type(exc).__name__}") from None
        if self.buffer_incarnation in (None, incarnation):
            self.buffer_incarnation = incarnation
            return
        self.buffer_incarnation = incarnation
        self.buffer_restarts += 1
        log.warning("the rollout buffer was restarted (its process died); the rows it held are generated again "
                    "with the same ids")
        self.syncer.buffer_restarted()

    def wait_for(self, ref: ray.ObjectRef, poll_s: float = 1.0) -> bool:
        """Until ``ref`` is ready (True), keeping actors busy; False when every actor is gone too long."""
        while True:
            ready, _ = ray.wait([ref, *self.pending], num_returns=1, timeout=poll_s)
            if ready and ready[0] == ref:
                return True
            if ready:
                self._collect(ready[0])
            self._retry_down()
            if self.gone_for() > self.gone_timeout_s:
                return False

    def _collect(self, ref: ray.ObjectRef) -> None:
        i, stale = self.pending.pop(ref), ref in self.stale
        self.stale.discard(ref)
        try:
            self.rows += ray.get(ref)
        except ACTOR_GONE as exc:
            self.mark_gone(i, type(exc).__name__)
            return  # called again by _retry_down after retry_s
        if stale:  # the dead process's last step (its rows are in the buffer): the actor is not back yet
            self._submit(i)
            return
        if self.down.pop(i, None) is not None:
            self.recoveries += 1
            log.warning("rollout-%d is back (restarted by Ray) and generating again", i)
        self.last_up = self.clock()
        self._submit(i)

    def mark_gone(self, i: int, why: str) -> None:
        """Actor ``i``'s call failed because its process is gone (here, or in a weight sync); it is up
        again at its next successful step."""
        if i not in self.down:
            log.warning("rollout-%d is gone (%s); Ray restarts it if it has restarts left", i, why)
            self._wake_learner()
            self.deaths += 1
            # A death seen by a weight sync: the call still queued may return from the old process.
            self.stale.update(ref for ref, a in self.pending.items() if a == i)
        self.failed_calls += 1
        self.down[i] = self.clock()

    def record_sync(self, result) -> None:
        """The actors a weight sync (a ``SyncResult``) found dead: counted as deaths, caught up at restart."""
        for i in sorted(result.gone):
            self.mark_gone(i, "died during a weight sync")

    def _wake_learner(self) -> None:
        """If the buffer lacks the last sync's weights (broadcast transport), a learner waiting for rows,
        which only the dead actor may bring, lets go, so that ``learner_step`` can leave them there."""
        if self.syncer is not None and self.syncer.restarts_lack_weights:
            self.learner_woken = True
            self.buffer.wake.remote()

    def _retry_down(self) -> None:
        now = self.clock()
        for i, since in list(self.down.items()):
            if now - since >= self.retry_s and i not in self.pending.values():
                self.down[i] = now
                self._submit(i)

    def gone_for(self) -> float:
        """Seconds since the last moment any actor was up, while all are down; 0 otherwise."""
        if len(self.down) < len(self.actors):
            return 0.0
        return self.clock() - self.last_up

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait for the queued calls (end of the stage); calls of gone actors are ignored."""
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ACTOR_GONE:
                pass
        self.pending.clear()
        self.stale.clear()

    def stats(self) -> dict:
        return {"actor_deaths": self.deaths, "failed_calls": self.failed_calls, "actor_recoveries": self.recoveries,
                "actors_down": len(self.down), "buffer_restarts": self.buffer_restarts}

    def gone_message(self) -> str:
        return (f"every rollout actor has been gone for more than rollout.gone_timeout_s={self.gone_timeout_s:g} s "
                f"(restarts used up: rollout.max_restarts={self.max_restarts})")


def call_restarting(call, timeout_s: float = 120.0):
    """``ray.get(call())``, called again while Ray restarts the actor (its calls fail fast meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(call())
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def predict_all(actors: list, shards: list[list], on_gone=lambda: None, retry_s: float = 1.0) -> list[dict]:
    """Every shard's ``predict`` records, shard ``i`` on actor ``i``; an evaluation survives a dead actor.

    When an actor is seen gone, ``on_gone()`` runs first (the driver leaves the current weights where a
    restarted actor loads them). Its shard goes again to the same actor while Ray restarts it (every
    ``retry_s``), or to the next actor once it is dead for good. Raises when no actor is left.
    """
    pending = {actors[i].predict.remote(sh): (i, i, 0) for i, sh in enumerate(shards) if sh}  # shard, actor, moves
    gone: set[int] = set()  # actors seen gone and not seen working since
    out: list[dict] = []
    while pending:
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        shard, actor, moved = pending.pop(ref)
        try:
            out += ray.get(ref)
            gone.discard(actor)
            continue
        except ACTOR_GONE as exc:
            if actor not in gone:
                gone.add(actor)
                log.warning("evaluation: rollout-%d is gone (%s)", actor, type(exc).__name__)
                on_gone()
            if isinstance(exc, (ActorUnavailableError, OutOfMemoryError)):  # Ray restarts it: the same actor again
                time.sleep(retry_s)
            elif moved + 1 < len(actors):  # dead for good (no restarts left): the next actor
                moved += 1
                actor = (shard + moved) % len(actors)
            else:
                raise
        pending[actors[actor].predict.remote(shards[shard])] = (shard, actor, moved)
    return out


def rollout_stats(actors: list, buffer, supervisor: RolloutSupervisor | None = None) -> dict:
    """Each actor's counters (``{"gone": 1}`` for one that does not answer), the buffer's, the supervisor's."""
    stats = []
    for a in actors:
        try:
            stats.append(ray.get(a.stats.remote(), timeout=30))
        except (*ACTOR_GONE, ray.exceptions.GetTimeoutError):
            stats.append({"gone": 1})
    out = {"buffer": call_restarting(buffer.stats.remote), "actors": stats}
    if supervisor is not None:
        out["supervisor"] = supervisor.stats()
    return out
