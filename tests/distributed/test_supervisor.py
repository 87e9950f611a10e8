"""RolloutSupervisor's bookkeeping of actor deaths, without Ray: `ray.get` is replaced by what Ray raises
for a call whose actor died (the killed-process paths run for real in tests/distributed/test_sync_faults.py
and the launcher kill tests)."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, OutOfMemoryError

import coordexp_rl.driver.supervisor as supervisor


class FakeActor:
    """``step.remote()`` / ``predict.remote(shard)`` return a fresh token; ``ray.get`` is faked per test."""

    def __init__(self):
        self.calls = 0
        actor = self

        class Method:
            @staticmethod
            def remote(*args):
                actor.calls += 1
                return id(actor), actor.calls, tuple(map(tuple, args))  # hashable, like a ref

        self.step = self.predict = Method


class FakeSyncer:
    restarts_lack_weights = True  # the buffer lacks the last sync's weights: a death wakes the learner


class FakeBuffer:
    def __init__(self):
        self.wakes = 0
        buffer = self

        class Wake:
            @staticmethod
            def remote():
                buffer.wakes += 1

        class Incarnation:  # the same process throughout
            @staticmethod
            def remote():
                return "incarnation"

        self.wake, self.get_incarnation = Wake, Incarnation


@pytest.mark.parametrize("death", [OutOfMemoryError("killed by Ray's memory monitor"), ActorDiedError()],
                         ids=["memory_monitor", "died"])
def test_a_call_cut_by_a_death_marks_the_actor_down_then_up(monkeypatch, death):
    actors, buffer = [FakeActor(), FakeActor()], FakeBuffer()
    sup = supervisor.RolloutSupervisor(actors, gone_timeout_s=60, retry_s=0, buffer=buffer, syncer=FakeSyncer())
    sup.start()
    failing = next(ref for ref, i in sup.pending.items() if i == 1)

    def get(ref):
        if ref == failing:
            raise death
        return 4

    monkeypatch.setattr(supervisor.ray, "get", get)
    sup._collect(failing)
    assert buffer.wakes == 1 and sup.learner_woken and sup.deaths == 1
    assert 1 in sup.down and 1 not in sup.pending.values()
    sup._retry_down()  # called again while Ray restarts it: that call fails too, still one death
    failing = next(ref for ref, i in sup.pending.items() if i == 1)
    sup._collect(failing)
    assert buffer.wakes == 1 and sup.learner_woken and (sup.deaths, sup.failed_calls) == (1, 2)
    sup._retry_down()  # its next call succeeds
    retried = next(ref for ref, i in sup.pending.items() if i == 1)
    sup._collect(retried)
    assert sup.recoveries == 1 and not sup.down and sup.rows == 4 and actors[1].calls == 4
    assert sup.stats() == {"actor_deaths": 1, "failed_calls": 2, "actor_recoveries": 1, "actors_down": 0,
                           "buffer_restarts": 0}


def test_a_death_seen_by_a_weight_sync_counts_once_and_ends_at_a_step_of_the_new_process(monkeypatch):
    """An actor killed while the driver syncs weights may fail none of the supervisor's calls (its step had
    returned; the next one runs in the restarted process): the syncer reports it, and it counts. The call
    queued before that report may still return from the old process: it does not mark the actor back
    (the launcher's kill test once counted two deaths for one kill that way); only a later call does."""
    actors, buffer = [FakeActor(), FakeActor()], FakeBuffer()
    sup = supervisor.RolloutSupervisor(actors, gone_timeout_s=60, retry_s=0, buffer=buffer, syncer=FakeSyncer())
    sup.start()
    old_step = next(ref for ref, i in sup.pending.items() if i == 1)
    restarting = []

    def get(ref):
        if ref in restarting:
            raise ActorUnavailableError("The actor is restarting", None)
        return 4

    monkeypatch.setattr(supervisor.ray, "get", get)
    sup.mark_gone(1, "died during a weight sync")
    assert buffer.wakes == 1 and sup.learner_woken and 1 in sup.down and sup.stats()["actor_deaths"] == 1
    sup._collect(old_step)  # the old process's last step: rows counted, still down, the next call queued
    assert 1 in sup.down and sup.recoveries == 0 and sup.rows == 4 and 1 in sup.pending.values()
    restarting.append(next(ref for ref, i in sup.pending.items() if i == 1))
    sup._collect(restarting[0])  # refused while Ray restarts it: still the one death
    assert buffer.wakes == 1 and sup.learner_woken and sup.deaths == 1 and 1 in sup.down
    sup._retry_down()
    sup._collect(next(ref for ref, i in sup.pending.items() if i == 1))  # the new process's first step
    assert buffer.wakes == 1 and sup.learner_woken and not sup.down and sup.recoveries == 1 and sup.rows == 8
    assert sup.stats() == {"actor_deaths": 1, "failed_calls": 2, "actor_recoveries": 1, "actors_down": 0,
                           "buffer_restarts": 0}


def test_an_evaluation_waits_for_an_actor_the_memory_monitor_killed(monkeypatch):
    """One actor, killed mid-predict by Ray's memory monitor: Ray restarts it, so its shard goes to it again."""
    actor, gone = FakeActor(), []
    monkeypatch.setattr(supervisor.ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))

    def get(ref):
        if ref[1] == 1:
            raise OutOfMemoryError("killed by Ray's memory monitor")
        return [{"sample_id": s} for s in ref[2][0]]

    monkeypatch.setattr(supervisor.ray, "get", get)
    out = supervisor.predict_all([actor], [["a", "b"]], on_gone=lambda: gone.append(1), retry_s=0)
    assert out == [{"sample_id": "a"}, {"sample_id": "b"}] and gone == [1] and actor.calls == 2


class FakeLearner:
    def __init__(self):
        self.calls = 0
        learner = self

        class Step:
            @staticmethod
            def remote(buffer, timeout_s):
                learner.calls += 1
                return "step", learner.calls

        self.stage2_step_from_buffer = Step


class RecordingSyncer(FakeSyncer):
    def __init__(self):
        self.published = 0

    def keep_weights_for_restarts(self):
        self.published += 1


def test_learner_step_after_a_death_leaves_the_weights_and_retries_the_woken_step(monkeypatch):
    """A death wakes the learner waiting for rows (its step returns None); the weights go to the buffer
    for the restarted actor and the step runs again."""
    actors, buffer, syncer, learner = [FakeActor()], FakeBuffer(), RecordingSyncer(), FakeLearner()
    sup = supervisor.RolloutSupervisor(actors, gone_timeout_s=60, retry_s=0, buffer=buffer, syncer=syncer)
    monkeypatch.setattr(supervisor.ray, "wait", lambda refs, num_returns, timeout: (refs[:1], refs[1:]))
    monkeypatch.setattr(supervisor.ray, "get", lambda ref: None if ref == ("step", 1) else {"loss/total": 1.0})
    sup.mark_gone(0, "killed")
    assert sup.learner_step(learner) == {"loss/total": 1.0}
    assert learner.calls == 2 and syncer.published == 1 and buffer.wakes == 1 and not sup.learner_woken


def test_learner_step_stops_when_every_actor_is_gone_too_long(monkeypatch):
    actors, buffer, learner, now = [FakeActor()], FakeBuffer(), FakeLearner(), [0.0]
    interrupted = []
    buffer.interrupt = type("Interrupt", (), {"remote": staticmethod(lambda: interrupted.append(1))})
    sup = supervisor.RolloutSupervisor(actors, gone_timeout_s=5, retry_s=100, buffer=buffer,
                                       syncer=RecordingSyncer(), max_restarts=2, clock=lambda: now[0])
    sup.mark_gone(0, "killed")
    now[0] = 10.0  # gone for longer than gone_timeout_s, and the learner's step never comes

    monkeypatch.setattr(supervisor.ray, "wait", lambda refs, num_returns, timeout: ([], refs))
    monkeypatch.setattr(supervisor.ray, "get", lambda ref: None)
    with pytest.raises(supervisor.ActorsGone, match=r"rollout.gone_timeout_s=5 s.*rollout.max_restarts=2"):
        sup.learner_step(learner)
    assert interrupted == [1]  # the learner's blocked wait for rows was released first
