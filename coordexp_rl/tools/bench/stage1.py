"""Stage-1 learning curve in one process (no Ray, no vLLM): `coordexp-rl bench stage1 [--config F] [k=v ...]`.

Trains the config's Stage-1 on its training set (the tiny model and synthetic set of the config, built on
first use) and every ``--every`` steps greedy-decodes the validation set with the transformers engine and
scores it; prints one JSON line per evaluation. Use it to tune the embedded default quickly: the same
learner code as the launcher, without the minute of Ray and vLLM start-up per try.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (default: the embedded default)")
    parser.add_argument("--every", type=int, default=1000, help="evaluate every N steps (and at the end)")
    parser.add_argument("--until", type=int, default=0,
                        help="stop after N steps (0 = stage1.steps); the lr schedule still spans stage1.steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")


def run(args: argparse.Namespace) -> int:
    import torch

    from actors.hf_engine import HFEngine
    from coordexp_rl.config import load_config
    from coordexp_rl.data.loader import load_samples
    from coordexp_rl.data.stream import BatchStream
    from coordexp_rl.driver.assets import prepare_assets
    from coordexp_rl.evaluation.metrics import evaluate
    from coordexp_rl.evaluation.records import load_jsonl
    from coordexp_rl.evaluation.report import summary
    from coordexp_rl.rollout.engine import EngineConfig
    from coordexp_rl.rollout.predict import predict
    from learner.learner import Learner

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    assets = prepare_assets(cfg)
    root = assets.image_root
    train = load_samples(assets.train_path, root, skip_bbox_norm=cfg.data.skip_bbox_norm)
    val = load_samples(assets.val_path, root, skip_bbox_norm=cfg.data.skip_bbox_norm)[: cfg.eval.max_samples]
    gts = load_jsonl(assets.val_path)[: len(val)]
    learner = Learner(cfg, assets.model_path)
    stream = BatchStream(train, cfg.optim.batch_size, cfg.run.seed)
    losses: list[float] = []
    train_s = 0.0  # training time only; evaluations are not counted
    with tempfile.TemporaryDirectory() as tmp:
        done, until = 0, min(args.until or cfg.stage1.steps, cfg.stage1.steps)
        while done < until:
            n = min(args.every, until - done)
            t0 = time.perf_counter()
            losses += [m["loss/total"] for m in learner.stage1_steps(stream.next_batch, n)]  # as the launcher's learner
            train_s += time.perf_counter() - t0
            done += n
            engine = HFEngine(EngineConfig(model_path=str(learner.export_pretrained(Path(tmp) / "model")), kind="hf"))
            preds = list(predict(engine, val, cfg.data.prompt, batch_size=16,
                                 max_new_tokens=cfg.rollout.max_new_tokens))
            head = summary(evaluate(gts, preds, score_modes=("constant", "coord_prob", "object_prob")))
            recent = losses[-min(len(losses), 100):]
            print(json.dumps({
                "step": done, "train_s": round(train_s, 1), "s_per_step": round(train_s / done, 4),
                "loss": round(sum(recent) / len(recent), 4),
                **{k: None if head.get(k) is None else round(head[k], 4) for k in (
                    "constant/AP50", "coord_prob/AP50", "object_prob/AP50", "constant/mAP", "object_prob/mAP",
                    "f1@0.5/f1", "f1_class_agnostic", "mean_iou", "mean_iou_class_agnostic",
                    "parse_failure_rate")}}), flush=True)
    print(f"[bench stage1] {done} of {cfg.stage1.steps} steps; config overrides {args.overrides}", file=sys.stderr)
    return 0
