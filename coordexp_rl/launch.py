"""The main job: `python -m coordexp_rl.launch [--config FILE] [key.sub=value ...]`.

Reads the config, joins the Ray cluster that `ray job submit` provides (or starts a local one), reserves
dedicated bundles for the rollout actors and the learner, then: evaluate -> Stage-1 -> sync -> evaluate
-> Stage-2 EM loop (actors generate continuously into the buffer, the learner consumes, weights sync
back every `stage2.sync_every` steps) -> evaluate -> export. With no arguments it runs the embedded
default: the tiny model and the synthetic set, built on first use into the cache folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from coordexp_rl.config import Config, ConfigError, dump_config, load_config

log = logging.getLogger("coordexp_rl.launch")


class ResourceError(RuntimeError):
    """The config asks for more than the cluster has."""


class Driver:
    """One run: owns the Ray handles (learner, rollout actors, buffer) and the run folder."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.run.out_dir)
        self.results: dict[str, dict] = {}

    # ------------------------------------------------------------------------------------------------
    # The whole run on one screen
    # ------------------------------------------------------------------------------------------------

    def run(self) -> str:
        assets = self.prepare()
        self.connect_ray()
        self.start_workers(assets, self.reserve_resources())
        self.results["initial"] = self.evaluate("initial")
        self.stage1()
        self.sync_weights()
        self.results["stage1"] = self.evaluate("stage1")
        self.stage2()
        self.results["stage2"] = self.evaluate("stage2")
        return self.finish()

    # ------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------

    def prepare(self):
        from coordexp_rl.assets import prepare_assets
        from coordexp_rl.run_log import RunLog

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        self.log = RunLog(self.out)
        self.assets = prepare_assets(self.cfg)
        log.info("model %s, train %s, val %s", self.assets.model_path, self.assets.train_path, self.assets.val_path)
        return self.assets

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per rollout actor, then one per learner rank (dedicated devices for each)."""
        r, lr = self.cfg.rollout, self.cfg.learner
        actor = {"CPU": r.cpus_per_actor, **({"GPU": r.gpus_per_actor} if r.gpus_per_actor else {})}
        learner = {"CPU": lr.cpus, **({"GPU": lr.gpus} if lr.gpus else {})}
        return [dict(actor) for _ in range(r.num_actors)] + [dict(learner) for _ in range(lr.world_size)]

    def describe(self) -> str:
        return dump_config(self.cfg) + f"# placement bundles: {json.dumps(self.bundles())}\n"

    def connect_ray(self) -> None:
        import ray

        address = self.cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:  # inside `ray job submit`, or a cluster named in the config
            ray.init(address=address, log_to_driver=True)
        else:
            need = sum(b.get("CPU", 0) for b in self.bundles())
            ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                     include_dashboard=False, _node_ip_address="127.0.0.1")
        log.info("ray: %s", ray.cluster_resources())

    def reserve_resources(self):
        import ray
        from ray.util.placement_group import placement_group

        bundles = self.bundles()
        have = ray.cluster_resources()
        for key in ("CPU", "GPU"):
            want = sum(b.get(key, 0) for b in bundles)
            if want > have.get(key, 0):
                raise ResourceError(
                    f"the config asks for {want:g} {key} ({self.cfg.rollout.num_actors} rollout actors x "
                    f"{'gpus' if key == 'GPU' else 'cpus'}_per_actor + the learner's), the cluster has "
                    f"{have.get(key, 0):g}; lower rollout.num_actors / rollout.{key.lower()}s_per_actor / "
                    f"learner.{key.lower()}s or add nodes")
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready(), timeout=600)
        return pg

    def start_workers(self, assets, pg) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.buffer import RolloutBuffer
        from actors.rollout_actor import RolloutActor
        from coordexp_rl.inference import engine_config
        from learner.group import LearnerGroup

        cfg, r = self.cfg, self.cfg.rollout
        in_bundle = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
        spill = str(self.out / cfg.buffer.spill_dir) if cfg.buffer.spill_dir else None
        self.buffer = RolloutBuffer.remote(cfg.buffer.capacity, cfg.buffer.max_staleness,
                                           rows_per_version=cfg.optim.batch_size * cfg.stage2.sync_every,
                                           spill_dir=spill)
        lr = cfg.learner
        self.learner = LearnerGroup(
            cfg.model_dump(), str(assets.model_path), str(assets.train_path),
            str(assets.train_image_root) if assets.train_image_root else None, world_size=lr.world_size, placement_group=pg,
            bundle_indices=list(range(r.num_actors, r.num_actors + lr.world_size)), num_cpus=lr.cpus,
            num_gpus=lr.gpus, plan={"sharding": lr.sharding, "accum_steps": lr.accum_steps,
                                    "activation_checkpointing": lr.activation_checkpointing})
        train = self.load_data(assets.train_path, assets.train_image_root, cfg.data.check_images, train=True)
        self._val = self.load_data(assets.val_path, assets.val_image_root, cfg.data.check_images, train=False)
        items = [(s.sample_id, str(s.image_path), s.image_rel) for s in train]
        engine = engine_config(cfg, assets.model_path)  # the one used by `coordexp-rl infer --config` too
        self.sampling = rollout_sampling(cfg)
        self.actors = [
            RolloutActor.options(scheduling_strategy=in_bundle(i), num_cpus=r.cpus_per_actor,
                                 num_gpus=r.gpus_per_actor).remote(
                engine, items, cfg.data.prompt, self.sampling, batch_size=r.batch_size, actor_id=f"rollout-{i}",
                num_shards=r.num_actors, shard_index=i, buffer=self.buffer)
            for i in range(r.num_actors)]
        ready = ray.get([self.learner.ready.remote()] + [a.weight_version.remote() for a in self.actors])
        log.info("learner ready %s; %d rollout actors ready", ready[0], len(self.actors))
        if cfg.weight_sync.transport == "broadcast":
            self.join_weight_group()
        if cfg.run.resume:
            log.info("resumed from %s: %s", cfg.run.resume,
                     ray.get(self.learner.load_checkpoint.remote(cfg.run.resume)))
            self.sync_weights()

    def load_data(self, path, image_root, check_images: bool, train: bool) -> list:
        """Samples after the up-front checks (images once, prompt and target lengths); counts logged."""
        from coordexp_rl.data.limits import load_checked_samples
        from coordexp_rl.modeling.load import load_processor

        if getattr(self, "_processor", None) is None:
            self._processor = load_processor(self.assets.model_path, self.cfg.data.max_pixels, self.cfg.data.min_pixels)
        samples, counts = load_checked_samples(self.cfg, path, image_root, self._processor, check_images=check_images,
                                               train=train)
        if train:
            self.log.log("data", 0, counts)
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

        done = ray.get(self.learner.ready.remote())["step"]
        steps, chunk = steps or self.cfg.stage1.steps, max(1, self.cfg.run.log_every)
        m = {"loss/total": float("nan")}  # stays so when resuming past Stage-1
        with tqdm(total=steps, initial=min(done, steps), desc=label, unit="step", file=sys.stderr) as bar:
            while done < steps:
                n = min(chunk, steps - done)
                for m in ray.get(self.learner.stage1_steps.remote(n)):
                    self.log.log(label, m["step"], m)
                done += n
                bar.update(n)
                bar.set_postfix(loss=f"{m['loss/total']:.3f}")
                self.maybe_checkpoint(done)
        log.info("%s done: %d steps, loss %.4f", label, steps, m["loss/total"])

    def stage2(self) -> None:
        """Actors generate continuously (one queued step each); the learner consumes; weights sync back."""
        import ray
        from tqdm import tqdm

        s1 = self.cfg.stage1.steps
        if self.cfg.stage2.method == "sft":  # the control arm: Stage-2's steps spent on more SFT
            self.stage1(s1 + self.cfg.stage2.steps, label="stage2")
            return self.sync_weights()  # evaluation reads the actors' weights (the EM loop syncs as it goes)
        start = max(0, ray.get(self.learner.ready.remote())["step"] - s1)
        pending = {a.step.remote(): a for a in self.actors}
        with tqdm(total=self.cfg.stage2.steps, initial=start, desc="stage-2", unit="step", file=sys.stderr) as bar:
            for k in range(start, self.cfg.stage2.steps):
                step_ref = self.learner.stage2_step.remote(self.buffer)
                while True:  # keep every actor busy until the learner's step returns
                    ready, _ = ray.wait([step_ref, *pending], num_returns=1)
                    if ready[0] == step_ref:
                        break
                    actor = pending.pop(ready[0])
                    ray.get(ready[0])  # surfaces an actor failure here
                    pending[actor.step.remote()] = actor
                metrics = ray.get(step_ref)
                if metrics is None:
                    raise RuntimeError(f"stage-2 step {k}: no rollouts arrived; actor stats "
                                       f"{ray.get([a.stats.remote() for a in self.actors])}")
                self.log.log("stage2", metrics["step"], metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss/total']:.3f}", iou=f"{metrics['match/mean_iou']:.3f}")
                if (k + 1) % self.cfg.stage2.sync_every == 0:
                    self.sync_weights()
                self.maybe_checkpoint(s1 + k + 1)
        ray.get(list(pending))
        stats = {"buffer": ray.get(self.buffer.stats.remote()), "actors": ray.get([a.stats.remote() for a in self.actors])}
        self.log.log("rollout", s1 + self.cfg.stage2.steps, _flatten(stats))
        log.info("stage-2 done; rollout stats %s", stats)

    # ------------------------------------------------------------------------------------------------
    # Weights, evaluation, checkpoints
    # ------------------------------------------------------------------------------------------------

    def join_weight_group(self) -> None:
        """The `broadcast` transport: learner (rank 0) and actors form one torch.distributed group."""
        import ray

        ws = self.cfg.weight_sync
        backend = "nccl" if self.cfg.learner.gpus and self.cfg.rollout.gpus_per_actor else "gloo"
        addr, port = ray.get(self.learner.weight_group_address.remote())  # a free port on the learner's node
        world = len(self.actors) + 1
        ray.get([self.learner.join_weight_group.remote(addr, port, 0, world, backend, ws.timeout_s)] +
                [a.join_weight_group.remote(addr, port, i + 1, world, backend, ws.timeout_s)
                 for i, a in enumerate(self.actors)], timeout=ws.timeout_s + 30)
        log.info("weight group: %d ranks over %s at %s:%d", world, backend, addr, port)

    def sync_weights(self) -> None:
        """One control call per actor; the buffer's version moves only when every actor has loaded."""
        import ray

        t0 = time.perf_counter()
        bucket_mb = self.cfg.weight_sync.bucket_mb
        if self.cfg.weight_sync.transport == "broadcast":
            calls = {a.receive_broadcast_weights.remote(): i for i, a in enumerate(self.actors)}
            version = ray.get(self.learner.broadcast_weights.remote(bucket_mb))
        else:
            version, payload_ref = ray.get(self.learner.publish_weights_ref.remote(bucket_mb))
            calls = {a.update_weights.remote(payload_ref): i for i, a in enumerate(self.actors)}
        ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=self.cfg.weight_sync.timeout_s)
        failed = [f"rollout-{calls[r]}: timed out after {self.cfg.weight_sync.timeout_s} s" for r in late]
        for r in ready:
            try:
                ray.get(r)
            except Exception as e:  # the actor keeps its old weights; report and go on
                failed.append(f"rollout-{calls[r]}: {e}")
        seconds = time.perf_counter() - t0
        if failed:
            log.error("weight sync v%d failed on %d actors: %s", version, len(failed), failed)
        else:
            ray.get(self.buffer.set_version.remote(version))
        self.log.log("sync", version, {"version": version, "seconds": seconds, "failed_actors": len(failed)})
        log.info("weight sync v%d to %d actors in %.3f s", version, len(self.actors) - len(failed), seconds)

    def evaluate(self, label: str) -> dict:
        """Greedy predictions from the rollout actors (current weights) on the validation set, scored."""
        import ray

        from coordexp_rl.evaluation.metrics import evaluate_paired
        from coordexp_rl.evaluation.records import load_jsonl, pair_records
        from coordexp_rl.evaluation.report import summary, write_outputs

        n = self.cfg.eval.max_samples
        if getattr(self, "_val", None) is None:  # loaded (and checked) once per run
            self._val = self.load_data(self.assets.val_path, self.assets.val_image_root, self.cfg.data.check_images,
                                       train=False)
        samples = self._val[:n]
        gts = load_jsonl(self.assets.val_path)[: len(samples)]
        shards = [samples[i::len(self.actors)] for i in range(len(self.actors))]
        preds_by_id = {}
        for shard_preds in ray.get([a.predict.remote(sh) for a, sh in zip(self.actors, shards) if sh]):
            preds_by_id.update({p["sample_id"]: p for p in shard_preds})
        preds = [preds_by_id[s.sample_id] for s in samples]
        folder = self.out / "eval" / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        gt_records, pred_records = pair_records(gts, preds)
        metrics = evaluate_paired(gt_records, pred_records, score_modes=("constant", "coord_prob", "object_prob"))
        # metrics.json, plots, box overlays of 8 images and report.md: people look rather than read
        write_outputs(metrics, gt_records, pred_records, folder,
                      self.assets.val_image_root or self.assets.val_path.parent)
        headline = summary(metrics)
        step = ray.get(self.learner.ready.remote())["step"]
        self.log.log("eval", step, {"label": label, **{f"eval/{k}": v for k, v in headline.items()}})
        log.info("eval %s: %s", label, {k: headline.get(k) for k in ("constant/mAP", "constant/AP50", "f1@0.5/f1",
                                                                     "mean_iou", "parse_failure_rate")})
        return headline

    def maybe_checkpoint(self, step: int) -> None:
        import ray

        every = self.cfg.run.checkpoint_every
        if every and step % every == 0:
            path = ray.get(self.learner.save_checkpoint.remote(str(self.out / "checkpoints" / f"step-{step:06d}")))
            log.info("checkpoint %s", path)

    def finish(self) -> str:
        import ray

        from coordexp_rl.evaluation.plots import plot_training_curves

        ray.get(self.learner.save_checkpoint.remote(str(self.out / "checkpoints" / "final")))
        ray.get(self.learner.export.remote(str(self.out / "final_model")))
        ray.get(self.buffer.close.remote())
        self.log.close()
        plot_training_curves(self.out / "metrics.jsonl", self.out / "plots")
        table = results_table(self.results)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=float) + "\n")
        (self.out / "report.md").write_text(
            f"# Run {self.out}\n\n{table}\n\nTraining curves: `plots/`. Per evaluation (`eval/<label>/`): "
            "predictions, metrics.json, IoU and per-description plots, box overlays, report.md.\n")
        return table


def rollout_sampling(cfg: Config):
    """The rollout actors' decoding (config ``rollout``); equal to evaluation's by default."""
    from actors.engine import SamplingConfig

    r = cfg.rollout
    return SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          repetition_penalty=r.repetition_penalty, seed=r.seed)


def results_table(results: dict[str, dict]) -> str:
    cols = [("AP50 (object prob)", "object_prob/AP50"), ("mAP (object prob)", "object_prob/mAP"),
            ("AP50 (constant)", "constant/AP50"), ("AP50 (coord prob)", "coord_prob/AP50"), ("F1@0.5", "f1@0.5/f1"),
            ("mean IoU", "mean_iou"), ("mean IoU (class-agnostic)", "mean_iou_class_agnostic"),
            ("parse failures", "parse_failure_rate")]
    lines = ["| after | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in results.items():
        cells = (r.get(k) for _, k in cols)
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = value
    return flat


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
