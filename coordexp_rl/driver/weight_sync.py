"""The driver's side of a weight sync: one control call per rollout actor, by either transport, and
what happens when an actor is dead or dies during it.

- ``object_store``: the learner packs the weights into the object store once; the ref goes to the buffer
  (a restarted actor loads it when it registers) and to every actor (``update_weights``).
- ``broadcast``: the learner (rank 0) and the actors of the current weight group receive the weights by
  broadcast. The group is formed lazily from the actors not known to be down. When a broadcast fails (an
  actor died mid-transfer or before it, a timeout) the group is marked broken and re-formed at the next
  sync; this sync falls back to the object store for every actor that did not get the new version, and
  the weights stay in the buffer for the actors that restart (``keep_weights_for_restarts``).

Either way an actor that fails keeps its old weights; the others move on and the buffer's version moves
on, so the buffer's admission (permits by weight version) keeps the laggard from generating stale rows
until it catches up: at the next sync, or when it restarts.

>>> syncer = WeightSyncer(learner, actors, buffer, "broadcast", bucket_mb=64, timeout_s=120)  # doctest: +SKIP
>>> syncer.sync(down={1}).failed  # doctest: +SKIP
{}
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray

from coordexp_rl.driver.supervisor import ACTOR_GONE, call_restarting

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    version: int
    via: dict[int, str] = field(default_factory=dict)  # actor index -> "broadcast" / "object_store"
    failed: dict[int, str] = field(default_factory=dict)  # actor index -> why it kept its old weights
    # Actors whose process died during this sync (also when the fallback then reached the restarted one):
    # the supervisor hears of them from here, since a death between two of its calls fails none of them.
    gone: set[int] = field(default_factory=set)


class WeightSyncer:
    def __init__(self, learner, actors: list, buffer, transport: str, bucket_mb: int, timeout_s: float,
                 backend: str = "gloo"):
        if transport not in ("object_store", "broadcast"):
            raise ValueError(f"weight_sync.transport must be 'object_store' or 'broadcast', got {transport!r}")
        self.learner, self.actors, self.buffer = learner, actors, buffer
        self.transport, self.bucket_mb, self.timeout_s, self.backend = transport, bucket_mb, timeout_s, backend
        self.members: list[int] | None = None  # actors in the broadcast group (rank = position + 1); None: none
        self.version = 0  # the version of the last sync
        self.kept_version = 0  # the version whose weights the buffer holds for restarted actors (0: on disk)

    # --- the broadcast group ---------------------------------------------------------------------------

    def form_group(self, down: set[int] = frozenset(), strict: bool = False) -> bool:
        """A new group of the learner and the actors not in ``down``; False (or raise, ``strict``) if it
        does not form within ``timeout_s`` (an actor that died meanwhile): there is no group then."""
        self.members = None
        members = [i for i in range(len(self.actors)) if i not in down]
        addr, port = ray.get(self.learner.weight_group_address.remote())  # a fresh port: old groups are dead
        world = len(members) + 1
        calls = [self.learner.join_weight_group.remote(addr, port, 0, world, self.backend, self.timeout_s)]
        calls += [self.actors[i].join_weight_group.remote(addr, port, rank + 1, world, self.backend,
                                                          self.timeout_s) for rank, i in enumerate(members)]
        try:
            ray.get(calls, timeout=self.timeout_s + 30)
        except Exception as exc:  # noqa: BLE001 -- a dead or stuck actor: fall back, re-form later
            if strict:
                raise
            log.error("weight group of %d ranks did not form (%s); this sync goes through the object store",
                      world, _short(exc))
            return False
        self.members = members
        log.info("weight group: %d ranks over %s at %s:%d", world, self.backend, addr, port)
        return True

    # --- one sync --------------------------------------------------------------------------------------

    def sync(self, bump: bool = True, down: set[int] = frozenset()) -> SyncResult:
        """Send the learner's weights (a new version when ``bump``) to every actor; then the buffer's
        version follows. ``down``: actors known dead now (kept out of a newly formed group)."""
        if self.transport == "broadcast":
            res = self._broadcast(bump, down)
            laggards = [i for i in range(len(self.actors)) if i not in res.via]
        else:
            res, laggards = SyncResult(-1), list(range(len(self.actors)))
        if laggards:
            self._object_store(res, bump and res.version < 0, laggards)
        call_restarting(lambda: self.buffer.set_version.remote(res.version))
        self.version = res.version
        return res

    def _broadcast(self, bump: bool, down: set[int]) -> SyncResult:
        want = [i for i in range(len(self.actors)) if i not in down]
        if self.members != want and not self.form_group(down):  # new, broken, or someone died or came back
            return SyncResult(-1)
        calls = {self.actors[i].receive_broadcast_weights.remote(): i for i in self.members}
        try:
            version = ray.get(self.learner.broadcast_weights.remote(self.bucket_mb, bump))
        except Exception as exc:  # noqa: BLE001 -- a rank died mid-transfer; the learner's version was bumped
            log.error("weight broadcast failed on the learner (%s); the group is re-formed at the next sync",
                      _short(exc))
            version = ray.get(self.learner.status.remote())["version"]
        res = SyncResult(version)
        for i, why in self._wait(calls, res.gone).items():
            if why is None:
                res.via[i] = "broadcast"
            else:
                res.failed[i] = why
                log.warning("weight broadcast to rollout-%d failed (%s); the object store is tried next", i, why)
        if len(res.via) < len(self.members):
            self.members = None  # a failed collective leaves the group out of step: never reuse it
        return res

    def _object_store(self, res: SyncResult, bump: bool, laggards: list[int]) -> None:
        """The weights through the object store to ``laggards`` and to the buffer (for restarts). An actor
        Ray is restarting (ActorUnavailableError) is asked again until ``timeout_s`` has passed: loading a
        version twice is harmless, and its new process would otherwise miss this sync."""
        version, refs = self._put_weights(bump)
        res.version = version
        deadline = time.monotonic() + self.timeout_s
        while laggards:
            # The frozen-parameter ref goes nested in a list: only an actor that lacks those tensors fetches it.
            calls = {self.actors[i].update_weights.remote(refs[0], refs[1:]): i for i in laggards}
            laggards = []
            for i, why in self._wait(calls, res.gone, max(1.0, deadline - time.monotonic())).items():
                if why is None:
                    res.via[i] = "object_store"
                    res.failed.pop(i, None)
                else:
                    res.failed[i] = why
                    if why.startswith("ActorUnavailableError") and time.monotonic() < deadline:
                        laggards.append(i)
            if laggards:
                time.sleep(1.0)

    def _put_weights(self, bump: bool) -> tuple[int, list]:
        """The learner's weights into the object store and the buffer (where restarted actors load them):
        (version, [payload ref] + [frozen-parameter ref, if the model has frozen parameters])."""
        version, payload_ref, frozen_ref = ray.get(self.learner.put_weights.remote(self.bucket_mb, bump))
        refs = [payload_ref] + ([frozen_ref] if frozen_ref is not None else [])
        call_restarting(lambda: self.buffer.keep_weights.remote(version, refs))
        self.kept_version = version
        return version, refs

    def _wait(self, calls: dict, gone: set[int], timeout_s: float | None = None) -> dict[int, str | None]:
        """Each call's actor -> None (done) or why it failed (dead, error, not done in ``timeout_s``, by
        default weight_sync.timeout_s); the actors that were dead go into ``gone``."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout_s)
        out: dict[int, str | None] = {calls[r]: f"timed out after {timeout_s:g} s" for r in late}
        for r in ready:
            try:
                ray.get(r)
                out[calls[r]] = None
            except Exception as exc:  # noqa: BLE001 -- that actor keeps its old weights
                out[calls[r]] = _short(exc)
                if isinstance(exc, ACTOR_GONE):
                    gone.add(calls[r])
        return out

    # --- actors that died between syncs ----------------------------------------------------------------

    @property
    def restarts_lack_weights(self) -> bool:
        """Whether a restarted actor would find older weights in the buffer than the last sync's."""
        return self.kept_version < self.version

    def buffer_restarted(self) -> None:
        """The buffer's process was restarted, empty: the weights for restarted actors go there again."""
        self.kept_version = 0
        if self.version:
            version, _ = self._put_weights(False)
            log.info("weights v%d left in the restarted buffer for restarted rollout actors", version)

    def keep_weights_for_restarts(self) -> None:
        """An actor died: leave the learner's current weights in the buffer, where the restarted actor
        loads them before it generates (object store: already there), and re-form the group next time."""
        self.members = None
        if not self.restarts_lack_weights:
            return
        version, _ = self._put_weights(False)
        log.info("weights v%d left in the buffer for restarted rollout actors", version)


def _short(exc: Exception) -> str:
    """The error's type and last line (a remote error's text is its whole traceback)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
