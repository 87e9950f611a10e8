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

from coordexp_rl.config import Config, ConfigError, dump_config, load_config
from coordexp_rl.driver.evaluations import Evaluations, results_table
from coordexp_rl.driver.placement import ResourceError, bundles, connect_ray, reserve_resources
from coordexp_rl.driver.run_control import RunStopped, flatten, stop_on_signals

log = logging.getLogger("coordexp_rl.launch")


class Driver:
    """One run: owns the Ray handles (learner, rollout actors, buffer) and the run folder."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.step = 0  # the learner's step as the driver last saw it
        self.last_sync_step = -1  # learner step of the last weight sync (-1: none yet)
        self.stop_signal = 0  # set by the SIGINT/SIGTERM handler; the loops stop at the next step
        self.supervisor = None  # keeps the rollout actors busy in Stage-2 (coordexp_rl/driver/supervisor.py)
        self.failed_calls_seen = 0  # failed actor calls the driver has answered (weights left for the restarted)
        self.woken = False  # the learner's wait for rows was cut short to answer a death
        self.starting: list = []  # refs that answer once each rollout actor is up (check_actors)

    # ------------------------------------------------------------------------------------------------
    # The whole run on one screen
    # ------------------------------------------------------------------------------------------------

    def run(self) -> str:
        assets = self.prepare()
        connect_ray(self.cfg)
        self.start_workers(assets, reserve_resources(self.cfg))
        with stop_on_signals(self):
            self.evals.start("initial", self.step)  # the actors idle through Stage-1
            self.stage1()
            self.evals.wait()
            self.end_stage1()
            self.evals.once("stage1", self.step)
            self.stage2()
            self.evals.once("stage2", self.step)
        return self.finish()

    # ------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------

    def prepare(self):
        from coordexp_rl.driver.assets import prepare_assets

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        self.assets = prepare_assets(self.cfg)
        log.info("model %s, train %s, val %s", self.assets.model_path, self.assets.train_path, self.assets.val_path)
        return self.assets

    def describe(self) -> str:
        return dump_config(self.cfg) + f"# placement bundles: {json.dumps(bundles(self.cfg))}\n"

    def start_workers(self, assets, pgs) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.buffer import RolloutBuffer
        from actors.rollout_actor import RolloutActor
        from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
        from learner.group import LearnerGroup

        cfg, r = self.cfg, self.cfg.rollout
        in_bundle = lambda i: PlacementGroupSchedulingStrategy(pgs["rollout"], placement_group_bundle_index=i)  # noqa: E731
        spill = str(self.out / cfg.buffer.spill_dir) if cfg.buffer.spill_dir else None
        ln = cfg.learner  # the learner section (not a learning rate: that is cfg.optim.lr)
        self.learner = LearnerGroup(
            cfg.model_dump(), str(assets.model_path), str(assets.train_path),
            str(assets.train_image_root) if assets.train_image_root else None, world_size=ln.world_size,
            placement_group=pgs["learner"], bundle_indices=list(range(ln.world_size)), num_cpus=ln.cpus,
            num_gpus=ln.gpus, plan={"sharding": ln.sharding, "accum_steps": ln.accum_steps,
                                    "activation_checkpointing": ln.activation_checkpointing})
        train = self.load_data(assets.train_path, assets.train_image_root, cfg.data.check_images, train=True)
        self._val = self.load_data(assets.val_path, assets.val_image_root, cfg.data.check_images, train=False)
        items = [(s.sample_id, str(s.image_path), s.image_rel) for s in train]
        engine = EngineConfig.from_config(cfg, assets.model_path)  # `coordexp-rl infer --config` uses it too
        self.sampling = SamplingConfig.from_config(cfg.rollout)
        resumed = self.resume()  # the learner first: the buffer continues the checkpoint's row ids
        self.evals = Evaluations(self.score, self.log)
        if not resumed:  # a resumed run logged them before
            self.log_data_counts()
        self.buffer = RolloutBuffer.remote(cfg.buffer.capacity, cfg.buffer.max_staleness,
                                           rows_per_version=cfg.optim.batch_size * cfg.stage2.sync_every,
                                           spill_dir=spill, version=resumed.get("version", 0),
                                           next_seq=resumed.get("consumed"))
        # Held for the run: a restarted actor's constructor reads it again, and Ray alone frees a large
        # argument once the first construction is done (ray-project/ray#53727; restarts then fail).
        self.items_ref = ray.put(items)
        self.actors = [
            RolloutActor.options(scheduling_strategy=in_bundle(i), num_cpus=r.cpus_per_actor,
                                 num_gpus=r.gpus_per_actor, max_restarts=r.max_restarts).remote(
                engine, self.items_ref, cfg.data.prompt, self.sampling, batch_size=r.batch_size,
                actor_id=f"rollout-{i}", num_shards=r.num_actors, shard_index=i, buffer=self.buffer)
            for i in range(r.num_actors)]
        # The actors start beside Stage-1 (it needs only the learner); check_actors raises a failed start.
        self.starting = [a.weight_version.remote() for a in self.actors]
        log.info("learner up %s; %d rollout actors starting", ray.get(self.learner.status.remote()), len(self.actors))
        self.syncer = self.weight_syncer()
        if resumed:  # the actors get the checkpoint's weights (the same version when it was just synced)
            self.sync_weights(bump=resumed["driver"].get("last_sync_step") != self.step, label="resume")

    def resume(self) -> dict:
        """Load ``run.resume`` (a folder, or ``auto``: the newest complete one here) and open the run log
        rewound to it; {} on a fresh start. Returns the checkpoint's step, version, consumed ids, driver state."""
        from coordexp_rl.driver.run_control import Checkpoints, load_resume_point
        from coordexp_rl.driver.run_log import RunLog

        self.checkpoints = Checkpoints(self.learner, self.out / "checkpoints", self.cfg.run.checkpoint_every,
                                       self.cfg.run.keep_last)
        resumed = load_resume_point(self.learner, self.cfg.run.resume, self.out / "checkpoints")
        if not resumed:
            self.log = RunLog(self.out)
            return {}
        self.step = self.checkpoints.last_step = resumed["step"]
        self.checkpoints.last_path = resumed["path"]
        self.last_sync_step = resumed["driver"].get("last_sync_step", -1)
        self.log = RunLog(self.out, resume_step=self.step)
        log.info("resumed from %s at step %d (weight version %d); evaluations kept: %s", resumed["path"], self.step,
                 resumed["version"], sorted(self.log.evaluations()) or "none")
        return resumed

    def log_data_counts(self) -> None:
        self.log.log("data", 0, self._data_counts)

    def load_data(self, path, image_root, check_images: bool, train: bool) -> list:
        """Samples after the up-front checks (images once, prompt and target lengths); counts logged."""
        from coordexp_rl.data.limits import load_checked_samples
        from coordexp_rl.modeling.load import load_processor

        if getattr(self, "_processor", None) is None:
            self._processor = load_processor(self.assets.model_path, self.cfg.data.max_pixels, self.cfg.data.min_pixels)
        samples, counts = load_checked_samples(self.cfg, path, image_root, self._processor, check_images=check_images,
                                               train=train)
        if train:
            self._data_counts = counts  # logged once the run log is open (not again on a resume)
            if counts.get("data/truncated_samples"):
                log.warning("%s: %d samples truncated to data.max_target_tokens (%d objects dropped)", path,
                            counts["data/truncated_samples"], counts["data/dropped_objects"])
        return samples

    # ------------------------------------------------------------------------------------------------
    # Stages
    # ------------------------------------------------------------------------------------------------

    def stage1(self, steps: int | None = None, label: str = "stage1") -> None:
        """SFT steps on the canonical GT until the learner has taken ``steps`` (default: Stage-1's)."""
        import ray
        from tqdm import tqdm

        done = self.step
        steps, chunk = steps or self.cfg.stage1.steps, max(1, self.cfg.run.log_every)
        m = {"loss/total": float("nan")}  # stays so when resuming past Stage-1
        with tqdm(total=steps, initial=min(done, steps), desc=label, unit="step", file=sys.stderr) as bar:
            while done < steps:
                self.check_stop()
                self.check_actors()
                n = min(chunk, steps - done)
                for m in ray.get(self.learner.stage1_steps.remote(n)):
                    self.log.log(label, m["step"], m)
                done = self.step = self.step + n
                bar.update(n)
                bar.set_postfix(loss=f"{m['loss/total']:.3f}")
                self.checkpoints.maybe(self.step, self.driver_state())
        log.info("%s done: %d steps, loss %.4f", label, steps, m["loss/total"])

    def end_stage1(self) -> None:
        """Sync and checkpoint at the stage boundary (once), so a crash in Stage-2 never redoes Stage-1."""
        if self.last_sync_step < self.cfg.stage1.steps:
            self.sync_weights()
        if self.checkpoints.last_step < self.cfg.stage1.steps:
            self.checkpoints.save(self.step, self.driver_state())

    def stage2(self) -> None:
        """Actors generate continuously (one queued step each); the learner consumes; weights sync back."""
        from tqdm import tqdm

        from coordexp_rl.driver.supervisor import RolloutSupervisor

        s1, total = self.cfg.stage1.steps, self.cfg.stage2.steps
        if self.cfg.stage2.method == "sft":  # the control arm: Stage-2's steps spent on more SFT
            self.stage1(s1 + total, label="stage2")
            return self.sync_weights()  # evaluation reads the actors' weights (the EM loop syncs as it goes)
        start = max(0, self.step - s1)
        self.supervisor = RolloutSupervisor(self.actors, self.cfg.rollout.gone_timeout_s, on_death=self.wake_learner)
        self.supervisor.start()
        with tqdm(total=total, initial=start, desc="stage-2", unit="step", file=sys.stderr) as bar:
            for k in range(start, total):
                metrics = self.stage2_step(k)
                self.step = s1 + k + 1
                self.log.log("stage2", metrics["step"], metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", iou=f"{metrics['match/mean_iou']:.3f}")
                if (k + 1) % self.cfg.stage2.sync_every == 0:
                    self.sync_weights()
                self.checkpoints.maybe(self.step, self.driver_state())
        self.supervisor.drain()
        self.log_rollout_stats()
        log.info("stage-2 done; %s", self.supervisor.stats())

    def stage2_step(self, k: int) -> dict:
        """One learner step while the supervisor keeps the actors busy; stops the run when all are gone.
        After an actor death the learner (idle then) leaves its weights where the restarted actor looks."""
        import ray

        self.check_stop()
        while True:
            step_ref = self.learner.stage2_step.remote(self.buffer)
            if not self.supervisor.wait_for(step_ref):
                ray.get(self.buffer.interrupt.remote())  # the learner's blocked get returns None
                ray.get(step_ref)
                raise self.stopped(self.supervisor.gone_message(self.cfg.rollout.max_restarts), exit_code=4)
            metrics = ray.get(step_ref)
            if self.supervisor.failed_calls > self.failed_calls_seen:  # a death, or a restart still under way
                self.failed_calls_seen = self.supervisor.failed_calls
                self.catch_up_restarted()
            if metrics is not None:
                return metrics
            if not self.woken:
                raise RuntimeError(f"stage-2 step {k}: no rollouts arrived; actor stats "
                                   f"{ray.get([a.stats.remote() for a in self.actors])}")
            self.woken = False  # woken by wake_learner: the step again, now that the weights are there

    def wake_learner(self, actor: int) -> None:
        """An actor died. If the buffer lacks the last sync's weights (broadcast transport), a learner
        waiting for rows (which only that actor may bring) lets go, so that stage2_step can leave them."""
        if self.syncer.needs_publish:
            self.woken = True
            self.buffer.wake.remote()

    def log_rollout_stats(self) -> None:
        """Buffer, actor (throughput, ids) and supervisor counters; at every sync and at the end of Stage-2."""
        from coordexp_rl.driver.supervisor import rollout_stats

        self.log.log("rollout", self.step, flatten(rollout_stats(self.actors, self.buffer, self.supervisor)))

    # ------------------------------------------------------------------------------------------------
    # Weights, evaluation, checkpoints
    # ------------------------------------------------------------------------------------------------

    def weight_syncer(self):
        """One control call per actor per sync; the `broadcast` transport's group forms here (strict: a
        group that cannot form at start-up is a set-up problem) and re-forms after actor deaths."""
        from coordexp_rl.driver.weight_sync import WeightSyncer

        ws = self.cfg.weight_sync
        backend = "nccl" if self.cfg.learner.gpus and self.cfg.rollout.gpus_per_actor else "gloo"
        syncer = WeightSyncer(self.learner, self.actors, self.buffer, ws.transport, ws.bucket_mb, ws.timeout_s,
                              backend)
        if ws.transport == "broadcast":
            syncer.form_group(strict=True)
        return syncer

    def sync_weights(self, bump: bool = True, label: str = "sync") -> None:
        """An actor that fails (dead mid-transfer, timed out) keeps its old weights; the others and the
        buffer move on, and the buffer's admission stops the laggard until it catches up (at the next
        sync, or at its restart, from the weights kept in the buffer). See coordexp_rl/driver/weight_sync.py."""
        t0 = time.perf_counter()
        down = set(self.supervisor.down) if self.supervisor else set()
        res = self.syncer.sync(bump, down)
        seconds = time.perf_counter() - t0
        if self.supervisor:  # actors that died during the sync: counted as deaths, caught up at restart
            for i in sorted(res.gone):
                self.supervisor.mark_gone(i, "died during a weight sync")
        if res.failed:
            log.error("weight sync v%d failed on %d actors: %s", res.version, len(res.failed),
                      {f"rollout-{i}": why for i, why in res.failed.items()})
        self.last_sync_step = self.step
        fallback = sum(v == "object_store" for v in res.via.values()) if self.syncer.transport == "broadcast" else 0
        self.log.log(label, self.step, {"version": res.version, "seconds": seconds, "failed_actors": len(res.failed),
                                        "object_store_fallbacks": fallback})
        log.info("weight sync v%d to %d actors in %.3f s", res.version, len(res.via), seconds)
        if label == "sync":
            self.log_rollout_stats()

    def catch_up_restarted(self) -> None:
        """After an actor death: the current weights wait in the buffer for the restarted actor."""
        self.syncer.publish_for_restarts()

    def score(self, label: str) -> dict:
        """The headline metrics of the actors' weights on the validation set (writes eval/<label>/)."""
        from coordexp_rl.driver.evaluations import evaluate_on_actors

        return evaluate_on_actors(self.actors, self._val[:self.cfg.eval.max_samples], self.assets.val_path,
                                  self.assets.val_image_root or self.assets.val_path.parent,
                                  self.out / "eval" / label,
                                  on_gone=self.catch_up_restarted)  # survives a dead actor

    def check_actors(self) -> None:
        """Raise a rollout actor's start-up error as soon as it is there (not at the end of Stage-1)."""
        import ray

        if self.starting:
            ready, self.starting = ray.wait(self.starting, num_returns=len(self.starting), timeout=0)
            ray.get(ready)
            if not self.starting:
                log.info("%d rollout actors up", len(self.actors))

    def driver_state(self) -> dict:
        return {"last_sync_step": self.last_sync_step}

    def check_stop(self) -> None:
        if self.stop_signal:
            raise self.stopped(f"stopped by {signal.Signals(self.stop_signal).name}", 128 + self.stop_signal)

    def stopped(self, why: str, exit_code: int) -> RunStopped:
        """A final checkpoint, the buffer closed (spilled), the log closed: the error to raise."""
        import ray

        path = self.checkpoints.ensure(self.step, self.driver_state())
        ray.get(self.buffer.close.remote())
        self.log.close()
        return RunStopped(why, path, exit_code)

    def finish(self) -> str:
        import ray

        from coordexp_rl.evaluation.plots import plot_training_curves

        self.checkpoints.save(self.step, self.driver_state(), "final")
        ray.get(self.learner.export.remote(str(self.out / "final_model")))
        ray.get(self.buffer.close.remote())
        self.log.close()
        plot_training_curves(self.out / "metrics.jsonl", self.out / "plots")
        table = results_table(self.evals.results)
        (self.out / "results.json").write_text(json.dumps(self.evals.results, indent=2, default=float) + "\n")
        (self.out / "report.md").write_text(
            f"# Run {self.out}\n\n{table}\n\nTraining curves: `plots/`. Per evaluation (`eval/<label>/`): "
            "predictions, metrics.json, IoU and per-description plots, box overlays, report.md.\n")
        return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the embedded tiny CPU default)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and bundles, then stop")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    driver = Driver(cfg)
    if args.dry_run:
        print(driver.describe())
        return 0
    try:
        print(driver.run())
    except ResourceError as e:
        print(f"resource error: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:
        print(f"run stopped: {e.why}.\nCheckpoint: {e.checkpoint}\nResume with: python -m coordexp_rl.launch "
              f"{'--config ' + args.config + ' ' if args.config else ''}{' '.join(args.overrides)} "
              f"run.resume={e.checkpoint}", file=sys.stderr)
        return e.exit_code
    return 0


def main(argv: list[str] | None = None) -> int:
    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m coordexp_rl.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
