"""The main job: `python -m coordexp_rl.launch [--config FILE] [key.sub=value ...]`.

Reads the config, joins the Ray cluster that `ray job submit` provides (or starts a local one), reserves
dedicated bundles for the rollout actors and the learner, then: Stage-1 (beside it, the rollout actors
start and run the initial evaluation: they are idle until the first sync) -> sync -> evaluate -> Stage-2
EM loop (actors generate continuously into the buffer, the learner consumes, weights sync back every
`stage2.sync_every` steps) -> evaluate -> export. With no arguments it runs the embedded default: the tiny
model and the synthetic set, built on first use into the cache folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import ray
from ray.exceptions import RayActorError
from tqdm import tqdm

from coordexp_rl.config import Config, ConfigError, dump_config, flat_settings, load_config
from coordexp_rl.data.limits import load_checked_samples
from coordexp_rl.driver.assets import Assets, prepare_assets
from coordexp_rl.driver.console import Console
from coordexp_rl.driver.evaluations import (
    INITIAL,
    Evaluations,
    curve_label,
    evaluate_on_actors,
    exposure_report,
    results_table,
)
from coordexp_rl.driver.faults import FaultInjector
from coordexp_rl.driver.placement import ResourceError, bundles, connect_ray, node_ids, reserve_resources
from coordexp_rl.driver.plan import describe_plan
from coordexp_rl.driver.rollout import Rollout, start_rollout
from coordexp_rl.driver.run_control import (
    BestCheckpoint,
    Checkpoints,
    RunStopped,
    flatten,
    load_resume_point,
    stop_on_signals,
)
from coordexp_rl.driver.run_folder import claim_run_folder, probe_writable
from coordexp_rl.driver.run_log import RunLog
from coordexp_rl.driver.supervisor import ActorsGone, RolloutSupervisor, call_restarting, rollout_stats
from coordexp_rl.driver.trackers import check_installed, open_trackers
from coordexp_rl.driver.weight_sync import WeightSyncer
from coordexp_rl.errors import report_user_error
from coordexp_rl.evaluation.plots import plot_training_curves
from coordexp_rl.method.coords import CoordVocab
from coordexp_rl.modeling.load import load_processor
from learner.checkpoint import latest_checkpoint
from learner.group import LearnerGroup, LearnerNotPlaced
from learner.ray_learner import BufferGone

log = logging.getLogger("coordexp_rl.launch")


class Driver:
    """One run: owns the Ray handles (learner, rollout actors, buffer) and the run folder."""

    def __init__(self, cfg: Config, console: Console | None = None, verbose: bool = False):
        """``console``: the launch's logging (routed into the run folder once it is claimed); ``verbose``:
        engine, Ray and library output on the console too."""
        self.cfg = cfg
        self.console, self.verbose = console, verbose
        self.actor_options: dict = {}  # Ray options every actor gets (where its output goes)
        self.out = Path(cfg.run.out_dir)
        self.step = 0  # the learner's step as the driver last saw it
        self.last_sync_step = -1  # learner step of the last weight sync (-1: none yet)
        self.stop_signal = 0  # set by the SIGINT/SIGTERM handler; the loops stop at the next step
        self.learner_restarts = 0  # learner groups re-formed from a checkpoint in this job (learner.max_restarts)
        # Made by run(), in this order (None until then):
        self.faults: FaultInjector | None = None  # run.fail_at (faults.json: the points fired)
        self.assets: Assets | None = None  # model and data paths (built into the cache for the default)
        self.val_samples: list = []  # the checked validation samples
        self.learner = None  # learner.group.LearnerGroup
        self.run_log: RunLog | None = None  # metrics.jsonl + TensorBoard (rewound on a resume)
        self.checkpoints: Checkpoints | None = None
        self.best: BestCheckpoint | None = None  # eval.best_metric's checkpoint, when set
        self.evals: Evaluations | None = None
        self.rollout: Rollout | None = None  # buffer, actors, their work list
        self.syncer: WeightSyncer | None = None
        self.supervisor: RolloutSupervisor | None = None  # Stage-2 only: the actors' faults
        self.groups: dict = {}  # role -> placement group
        self.placement: dict = {}  # role -> node ids, as last logged

    # ------------------------------------------------------------------------------------------------
    # The whole run on one screen
    # ------------------------------------------------------------------------------------------------

    def run(self) -> str:
        self.prepare()
        train, counts = self.check_data()  # a data error ends the run here, before Ray starts
        local = connect_ray(self.cfg, log_to_driver=not self.actor_options)
        self.groups = reserve_resources(self.cfg, local)
        self.learner = self.start_learner(self.groups["learner"])
        resumed = self.resume()  # the learner first: the buffer continues the checkpoint's row ids
        if not resumed:  # a resumed run logged them before
            self.run_log.log("data", 0, counts)
        self.rollout = start_rollout(self.cfg, self.groups["rollout"], train, self.assets.model_path, self.out,
                                     resumed, self.actor_options)
        log.info("learner up %s; %d rollout actors starting", ray.get(self.learner.status.remote()),
                 len(self.rollout.actors))
        self.syncer = self.weight_syncer()
        self.log_placement()
        if resumed:  # the actors get the checkpoint's weights (the same version when it was just synced)
            self.sync_weights(bump=resumed["driver"].get("last_sync_step") != self.step, label="resume")
        with stop_on_signals(self):
            self.evals.start(INITIAL, self.step)  # the actors idle through Stage-1
            self.stage1()
            self.evals.wait()
            self.end_stage1()
            self.evals.once("stage1", min(self.step, self.cfg.stage1.steps))  # resumed in Stage-2: kept
            self.stage2()
            self.evals.once("stage2", self.step)
        return self.finish()

    # ------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        claim_run_folder(self.cfg)  # a folder holding another run is refused (or emptied: run.overwrite)
        probe_writable(self.out)
        self.faults = FaultInjector(self.cfg.run.fail_at, self.out)  # after the claim: run.overwrite forgets them
        if self.console is not None:
            self.actor_options = self.console.route(self.out, self.verbose)
        check_installed(self.cfg.run.loggers)  # a missing W&B / MLflow library: now, not after Stage-1 has started
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        self.assets = prepare_assets(self.cfg)
        log.info("model %s, train %s, val %s", self.assets.model_path, self.assets.train_path, self.assets.val_path)

    def describe(self) -> str:
        plan = "".join(f"# {line}\n" for line in describe_plan(self.cfg))
        return dump_config(self.cfg) + plan + f"# placement bundles: {json.dumps(bundles(self.cfg))}\n"

    def start_learner(self, group) -> LearnerGroup:
        """The learner ranks in their placement group (each loads the model and the training samples)."""
        cfg, a, plan = self.cfg, self.assets, self.cfg.learner
        return LearnerGroup(
            cfg.model_dump(), str(a.model_path), str(a.train_path),
            str(a.train_image_root) if a.train_image_root else None, world_size=plan.world_size,
            placement_group=group, bundle_indices=list(range(plan.world_size)), num_cpus=plan.cpus,
            num_gpus=plan.gpus, plan={"sharding": plan.sharding, "accum_steps": plan.accum_steps,
                                      "activation_checkpointing": plan.activation_checkpointing},
            actor_options=self.actor_options, start_timeout_s=cfg.run.placement_timeout_s)

    def check_data(self) -> tuple[list, dict]:
        """The up-front checks (images once, prompt and target lengths): the training samples and their
        counts; the validation samples are kept for the evaluations."""
        cfg, a = self.cfg, self.assets
        processor = load_processor(a.model_path, cfg.data.max_pixels, cfg.data.min_pixels)
        try:  # a stock Qwen3-VL folder fails here, not in the learner after Ray has started
            CoordVocab.from_tokenizer(processor.tokenizer)
        except ValueError as exc:
            raise ConfigError(f"model.path={a.model_path}: {exc}") from None
        train, counts = load_checked_samples(cfg, a.train_path, a.train_image_root, processor,
                                             check_images=cfg.data.check_images, train=True)
        if counts.get("data/truncated_samples"):
            log.warning("%s: %d samples truncated to data.max_target_tokens (%d objects dropped)", a.train_path,
                        counts["data/truncated_samples"], counts["data/dropped_objects"])
        self.val_samples, _ = load_checked_samples(cfg, a.val_path, a.val_image_root, processor,
                                                   check_images=cfg.data.check_images, train=False)
        if cfg.eval.every and cfg.eval.every_samples > len(self.val_samples):
            raise ConfigError(f"eval.every_samples={cfg.eval.every_samples}: {a.val_path} holds only "
                              f"{len(self.val_samples)} validation samples")
        return train, counts

    def resume(self) -> dict:
        """Load ``run.resume`` (a folder, or ``auto``: the newest complete one here) and open the run log
        rewound to it; {} on a fresh start. Returns the checkpoint's step, version, consumed ids, driver state."""
        cfg = self.cfg
        self.checkpoints = Checkpoints(self.learner, self.out / "checkpoints", cfg.run.checkpoint_every,
                                       cfg.run.keep_last)
        resumed = load_resume_point(self.learner, cfg.run.resume, self.out / "checkpoints")
        if resumed:
            self.step = self.checkpoints.last_step = resumed["step"]
            self.checkpoints.last_path = resumed["path"]
            self.last_sync_step = resumed["driver"].get("last_sync_step", -1)
        resume_step = self.step if resumed else None
        trackers = open_trackers(cfg.run.loggers, self.out, flat_settings(cfg.model_dump()), resume_step)
        self.run_log = RunLog(self.out, resume_step, trackers)
        self.best = BestCheckpoint(self.checkpoints, cfg.eval.best_metric) if cfg.eval.best_metric else None
        self.evals = Evaluations(self.score, self.run_log, on_scored=self.best.scored if self.best else None,
                                 eval_dir=self.out / "eval")
        if resumed:
            log.info("resumed from %s at step %d (weight version %d); evaluations kept: %s", resumed["path"],
                     self.step, resumed["version"], sorted(self.run_log.evaluations()) or "none")
        return resumed

    # ------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------

    def stage1(self, steps: int | None = None, label: str = "stage1") -> None:
        """SFT steps on the canonical GT until the learner has taken ``steps`` (default: Stage-1's)."""
        steps, chunk = steps or self.cfg.stage1.steps, max(1, self.cfg.run.log_every)
        m = {"loss/total": float("nan")}  # stays so when resuming past Stage-1
        every = self.cfg.eval.every  # learning-curve points (also in the SFT control's Stage-2)
        offset = self.cfg.stage1.steps if label == "stage2" else 0  # run.fail_at counts from the stage's start
        with tqdm(total=steps, initial=min(self.step, steps), desc=label, unit="step", file=sys.stderr) as bar:
            while self.step < steps:
                self.check_stop()
                self.rollout.raise_start_failure()
                self.evals.raise_failure()
                done = self.step
                n = min(chunk, steps - done, every - done % every if every else chunk)
                try:
                    for m in ray.get(self.learner.stage1_steps.remote(n)):
                        self.run_log.log(label, m["step"], m)
                    self.step = done + n
                    self.save_checkpoint_if_due()
                    if every and self.step % every == 0 and self.step < steps:
                        self.evaluate_beside_training()
                    self.fire_faults(label, self.step - offset)
                except RayActorError as exc:
                    if not self.learner.owns(exc):
                        raise
                    self.restart_learner(exc)
                bar.n = min(self.step, steps)
                bar.set_postfix(loss=f"{m['loss/total']:.3f}")
        log.info("%s done: %d steps, loss %.4f", label, steps, m["loss/total"])

    def evaluate_beside_training(self) -> None:
        """A learning-curve point (eval.every): the current weights to the idle actors, scored in a thread
        while the learner goes on. The previous evaluation (or the initial one) ends first: a sync must not
        change the weights under it, so an evaluation slower than eval.every steps holds the learner up."""
        t0 = time.perf_counter()
        self.evals.wait()
        if time.perf_counter() - t0 > 1.0:
            log.warning("eval: the learner waited %.0f s for the previous evaluation (eval.every=%d steps is "
                        "shorter than one evaluation of eval.every_samples=%d)", time.perf_counter() - t0,
                        self.cfg.eval.every, self.cfg.eval.every_samples)
        self.sync_weights()
        if self.best:
            self.best.saving_for(self.step, self.driver_state())
        self.evals.start(curve_label(self.step), self.step, self.cfg.eval.every_samples)

    def end_stage1(self) -> None:
        """Sync and checkpoint at the stage boundary (once), so a crash in Stage-2 never redoes Stage-1."""
        if self.last_sync_step < self.cfg.stage1.steps:
            self.sync_weights()
        if self.checkpoints.last_step < self.cfg.stage1.steps:
            self.checkpoints.save(self.step, self.driver_state())

    def stage2(self) -> None:
        """Actors generate continuously (one queued step each); the learner consumes; weights sync back.
        Every actor fault is the supervisor's (coordexp_rl/driver/supervisor.py)."""
        s1, total = self.cfg.stage1.steps, self.cfg.stage2.steps
        if self.cfg.stage2.method == "sft":  # the control arm: Stage-2's steps spent on more SFT
            self.stage1(s1 + total, label="stage2")
            self.evals.wait()  # a curve point still scoring must keep its weights
            return self.sync_weights()  # evaluation reads the actors' weights (the EM loop syncs as it goes)
        start = max(0, self.step - s1)
        self.supervisor = RolloutSupervisor(self.rollout.actors, self.cfg.rollout.gone_timeout_s,
                                            buffer=self.rollout.buffer, syncer=self.syncer,
                                            max_restarts=self.cfg.rollout.max_restarts)
        self.supervisor.start()
        with tqdm(total=total, initial=start, desc="stage-2", unit="step", file=sys.stderr) as bar:
            while self.step < s1 + total:
                self.check_stop()
                try:
                    self.stage2_step(bar)
                except ActorsGone as e:
                    self.log_rollout_stats()  # the last counters: the rows lost with the actors are permits held
                    raise self.stopped(str(e), exit_code=4) from None
                except BufferGone as e:  # from the learner's task, Ray's copy carries the remote traceback
                    raise self.stopped(str(getattr(e, "cause", None) or e), exit_code=4) from None
                except RayActorError as exc:
                    if not self.learner.owns(exc):
                        raise
                    self.restart_learner(exc)
                    bar.n = self.step - s1
        self.supervisor.drain()
        self.log_rollout_stats()
        log.info("stage-2 done; %s", self.supervisor.stats())

    def stage2_step(self, bar) -> None:
        """One EM step under the supervisor's watch, then what falls due at it: sync, checkpoint, curve point,
        an injected fault."""
        k = self.step - self.cfg.stage1.steps  # Stage-2 steps taken
        metrics = self.supervisor.learner_step(self.learner)
        self.step += 1
        self.run_log.log("stage2", metrics["step"], metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", iou=f"{metrics['match/mean_iou']:.3f}")
        if (k + 1) % self.cfg.stage2.sync_every == 0:
            self.sync_weights()
        self.save_checkpoint_if_due()
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and k + 1 < self.cfg.stage2.steps:
            self.evaluate_in_stage2()
        self.fire_faults("stage2", k + 1)

    def evaluate_in_stage2(self) -> None:
        """A curve point in the EM loop (eval.every): the actors score it after the rollout step each has
        running (the supervisor queues no new one meanwhile), so the learner waits for it; the weights are
        synced first unless this step just did."""
        if self.last_sync_step != self.step:
            self.sync_weights()
        if self.best:
            self.best.saving_for(self.step, self.driver_state())
        self.evals.once(curve_label(self.step), self.step, self.cfg.eval.every_samples)

    def log_rollout_stats(self) -> None:
        """Buffer, actor (throughput, ids) and supervisor counters; at every sync and at the end of Stage-2."""
        stats = rollout_stats(self.rollout.actors, self.rollout.buffer, self.supervisor)
        self.run_log.log("rollout", self.step, flatten(stats))
        self.log_placement()

    def log_placement(self) -> None:
        """A "placement" record (node ids: the driver's, where the buffer is too, and each bundle's) whenever
        it changed: a lost node's bundles are "" until Ray places them on a node that joined."""
        where = {"driver": ray.get_runtime_context().get_node_id(),
                 **{role: node_ids(pg) for role, pg in self.groups.items() if pg is not None}}
        if where != self.placement:
            self.placement = where
            self.run_log.log("placement", self.step, where)

    # ------------------------------------------------------------------------------------------------
    # Weights, evaluation, checkpoints
    # ------------------------------------------------------------------------------------------------

    def weight_syncer(self) -> WeightSyncer:
        """One control call per actor per sync; the `broadcast` transport's group forms here (strict: a
        group that cannot form at start-up is a set-up problem) and re-forms after actor deaths."""
        ws = self.cfg.weight_sync
        backend = "nccl" if self.cfg.learner.gpus and self.cfg.rollout.gpus_per_actor else "gloo"
        syncer = WeightSyncer(self.learner, self.rollout.actors, self.rollout.buffer, ws.transport, ws.bucket_mb,
                              ws.timeout_s, backend)
        if ws.transport == "broadcast":
            syncer.form_group(strict=True)
        return syncer

    def sync_weights(self, bump: bool = True, label: str = "sync") -> None:
        """An actor that fails (dead mid-transfer, timed out) keeps its old weights; the others and the
        buffer move on, and the buffer's admission stops the laggard until it catches up (at the next
        sync, or at its restart, from the weights kept in the buffer). See coordexp_rl/driver/weight_sync.py."""
        t0 = time.perf_counter()
        res = self.syncer.sync(bump, set(self.supervisor.down) if self.supervisor else set())
        seconds = time.perf_counter() - t0
        if self.supervisor:
            self.supervisor.record_sync(res)
        if res.failed:
            log.error("weight sync v%d failed on %d actors: %s", res.version, len(res.failed),
                      {f"rollout-{i}": why for i, why in res.failed.items()})
        self.last_sync_step = self.step
        fallback = sum(v == "object_store" for v in res.via.values()) if self.syncer.transport == "broadcast" else 0
        self.run_log.log(label, self.step, {"version": res.version, "seconds": seconds,
                                            "failed_actors": len(res.failed), "object_store_fallbacks": fallback})
        log.info("weight sync v%d to %d actors in %.3f s", res.version, len(res.via), seconds)
        if label == "sync":
            self.log_rollout_stats()

    def score(self, label: str, n: int | None = None) -> dict:
        """The headline metrics of the actors' weights on the first ``n`` validation samples (None:
        eval.max_samples; writes eval/<label>/); an actor that dies meanwhile gets the current weights at its
        restart and its share runs again."""
        a = self.assets
        samples, folder = self.val_samples[:n or self.cfg.eval.max_samples], self.out / "eval" / label
        headline = evaluate_on_actors(self.rollout.actors, samples, a.val_path, a.val_image_root or a.val_path.parent,
                                      folder, on_gone=self.syncer.keep_weights_for_restarts)
        # Exposure bias: the learner's teacher-forced boxes on the same images. Not for "initial": it runs in
        # a thread beside Stage-1, where a learner call would interleave with training.
        if label in ("stage1", "stage2") and self.cfg.eval.exposure:
            tf = ray.get(self.learner.teacher_forced_ious.remote(
                str(a.val_path), str(a.val_image_root) if a.val_image_root else None, len(samples)))
            headline.update(exposure_report(tf, headline, a.val_path, folder, self.step - self.last_sync_step))
        return headline

    def save_checkpoint_if_due(self) -> None:
        self.checkpoints.save_if_due(self.step, self.driver_state())

    def driver_state(self) -> dict:
        return {"last_sync_step": self.last_sync_step}

    def fire_faults(self, stage: str, stage_step: int) -> None:
        """run.fail_at's points due at this step of the stage (none before prepare(): a driver driven by hand)."""
        if self.faults is not None:
            self.faults.fire_due(stage, stage_step, self.fault_targets())

    def fault_targets(self) -> dict:
        """What run.fail_at can kill: learner rank 0, the buffer, rollout-0."""
        return {"learner": self.learner.workers[0], "buffer": self.rollout.buffer, "rollout": self.rollout.actors[0]}

    def restart_learner(self, exc: RayActorError) -> None:
        """A learner rank died: the group again, from the newest complete checkpoint (learner.max_restarts
        times per run). In the EM loop the buffer drops what it holds and refuses rows of the lost weights, the
        actors generate again from the checkpoint's row ids with the restored weights. RunStopped (exit 5) when
        it cannot be re-formed."""
        lost_at, newest = self.step, latest_checkpoint(self.out / "checkpoints")
        why = f"learner rank died after step {lost_at} ({type(exc).__name__})"
        limit = self.cfg.learner.max_restarts
        if newest is None or self.learner_restarts >= limit:
            reason = ("no complete checkpoint to re-form the learner from yet (run.checkpoint_every)" if newest is None
                      else f"learner.max_restarts={limit} restarts used up")
            self.close_rollout()
            self.run_log.close()
            raise RunStopped(f"{why}; {reason}", str(newest or ""), exit_code=5)
        self.learner_restarts += 1
        log.warning("%s; re-forming the learner group from %s (restart %d of learner.max_restarts=%d)", why, newest,
                    self.learner_restarts, limit)
        try:
            self.learner.restart()
        except LearnerNotPlaced as e:
            self.close_rollout()
            self.run_log.close()
            raise RunStopped(f"{why}; re-forming it: {e} within run.placement_timeout_s="
                             f"{self.cfg.run.placement_timeout_s:g} s (its node lost, none with the learner's "
                             f"resources joined)", str(newest), exit_code=5) from None
        resumed = load_resume_point(self.learner, str(newest), self.out / "checkpoints")
        self.step = self.checkpoints.last_step = resumed["step"]
        self.checkpoints.last_path = resumed["path"]
        self.last_sync_step = resumed["driver"].get("last_sync_step", -1)
        self.run_log.rewind(self.step)  # the steps after the checkpoint are taken again
        version = ray.get(self.learner.continue_versions.remote(self.syncer.version))
        self.syncer.members = None  # a broadcast group held the dead rank 0
        if self.supervisor is not None:  # the EM loop: rows and weights after the checkpoint are lost
            dropped = call_restarting(lambda: self.rollout.buffer.restore.remote(resumed["consumed"], version + 1,
                                                                                 True))
            log.warning("buffer restored to the checkpoint's row ids (%d rows dropped, generated again)", dropped)
            self.sync_weights(label="restart")
        self.run_log.log("fault", self.step, {"learner_restarts": self.learner_restarts, "lost_at_step": lost_at,
                                              "steps_lost": lost_at - self.step})
        self.placement = {}  # logged again: the rewind dropped the records after the checkpoint
        self.log_placement()  # a lost node's ranks are on the node that joined
        log.warning("learner group re-formed at step %d: %d steps are taken again", self.step, lost_at - self.step)

    def close_rollout(self) -> None:
        """Close the buffer (its spill flushed) unless its process is gone for good."""
        try:
            call_restarting(self.rollout.buffer.close.remote)
        except RayActorError as exc:
            log.warning("the rollout buffer could not be closed (%s); its unflushed spill is lost", type(exc).__name__)

    def check_stop(self) -> None:
        if self.stop_signal:
            raise self.stopped(f"stopped by {signal.Signals(self.stop_signal).name}", 128 + self.stop_signal)

    def stopped(self, why: str, exit_code: int) -> RunStopped:
        """A final checkpoint, the buffer closed (spilled), the log closed: the error to raise."""
        path = self.checkpoints.ensure(self.step, self.driver_state())
        self.close_rollout()
        self.run_log.close()
        return RunStopped(why, path, exit_code)

    def finish(self) -> str:
        self.checkpoints.save(self.step, self.driver_state(), "final")
        ray.get(self.learner.export.remote(str(self.out / "final_model")))
        ray.get(self.rollout.buffer.close.remote())
        self.run_log.close()
        plot_training_curves(self.out / "metrics.jsonl", self.out / "plots")
        table = results_table(self.evals.results)
        (self.out / "results.json").write_text(json.dumps(self.evals.results, indent=2, default=float) + "\n")
        (self.out / "report.md").write_text(
            f"# Run {self.out}\n\n{table}\n\nTraining curves: `plots/`. Per evaluation (`eval/<label>/`): "
            "predictions, metrics.json, IoU and per-description plots, box overlays, report.md.\n")
        return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", help="YAML config (default: the embedded tiny CPU default); "
                        "given more than once, the files are layered in order (a later file's keys win)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan "
                        "(placement, learning rates, memory per device), then stop")
    parser.add_argument("--debug", action="store_true", help="show the traceback of config and data errors too")
    parser.add_argument("--verbose", action="store_true", help="print the engine's, Ray's and the libraries' "
                        "output too (by default it goes to the run folder's logs/)")


def run(args: argparse.Namespace) -> int:
    """The launch; a config or data error ends it with its message and exit code 2 (``--debug``: and the
    traceback), a resource error with 3, a stop with the checkpoint to resume from."""
    console = Console()
    try:
        return _run(args, console)
    finally:
        console.close()


def _run(args: argparse.Namespace, console: Console) -> int:
    debug = getattr(args, "debug", False)
    try:
        cfg = load_config(_configs(args), args.overrides)
    except ConfigError as e:
        return report_user_error(e, debug)
    driver = Driver(cfg, console, verbose=getattr(args, "verbose", False))
    if args.dry_run:
        print(driver.describe())
        return 0
    try:
        print(driver.run())
    except ResourceError as e:
        print(f"resource error: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:
        print(f"run stopped: {e.why}.\nCheckpoint: {e.checkpoint or 'none (the run starts again)'}\nResume with: "
              f"python -m coordexp_rl.launch {''.join(f'--config {c} ' for c in _configs(args))}"
              f"{' '.join(args.overrides)} run.resume={e.checkpoint or 'auto'}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a data file the driver's checks refuse (DataError), also from a Ray task
        code = report_user_error(e, debug)
        if code is None:
            raise
        return code
    return 0


def _configs(args: argparse.Namespace) -> list[str]:
    """The ``--config`` files in order (a caller's Namespace may hold one path as a string)."""
    return [args.config] if isinstance(args.config, str) else list(args.config or [])


def main(argv: list[str] | None = None) -> int:
    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()
    parser = argparse.ArgumentParser(prog="python -m coordexp_rl.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
