"""The embedded default's assets: the tiny model and the synthetic set, built once into the cache folder.

A config that names a real model folder or real data files uses those instead and builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coordexp_rl.config import Config, ConfigError, flat_settings, is_stage2_only
from coordexp_rl.runtime import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assets:
    model_path: Path
    train_path: Path
    val_path: Path
    image_root: Path | None  # None = each JSONL's own folder
    train_image_root: Path | None = None  # data.train_image_root, else image_root
    val_image_root: Path | None = None  # data.val_image_root, else image_root


def prepare_assets(cfg: Config) -> Assets:
    model = Path(cfg.model.path) if cfg.model.path else tiny_model(cfg)
    if not (model / "config.json").is_file():
        raise ConfigError(f"model.path={model}: no config.json there; point it at a Qwen3-VL folder "
                          "prepared with `coordexp-rl add-coord-tokens`, or leave it empty for the tiny model")
    if cfg.data.train:
        train, val = Path(cfg.data.train), Path(cfg.data.val or cfg.data.train)
    else:
        folder = synthetic_set(cfg)
        train, val = folder / "train.jsonl", folder / "val.jsonl"
    root = Path(cfg.data.image_root) if cfg.data.image_root else None
    train_root = Path(cfg.data.train_image_root) if cfg.data.train_image_root else root
    val_root = Path(cfg.data.val_image_root) if cfg.data.val_image_root else root
    return Assets(model, train, val, root, train_root, val_root)


def _keyed_dir(kind: str, params: dict) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{kind}-{key}"


def _build_once(target: Path, build) -> Path:
    """Build ``target`` once, safely when several processes ask for it at the same moment.

    Each process builds into its own temporary sibling (``mkdtemp``: two builders never share a folder)
    and renames it onto ``target`` in one atomic step. A folder at ``target`` is therefore always a
    finished build. The process that loses the race (the rename fails because another process put a
    finished folder there first) throws its own copy away and uses the winner's.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic; refuses to replace a non-empty folder
        except OSError:
            if not target.is_dir():
                raise
            log.info("%s was built by another process meanwhile; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_model(cfg: Config) -> Path:
    from coordexp_rl.modeling.tiny import make_tiny_model

    params = {"seed": cfg.model.tiny_seed, "size": cfg.model.tiny_size}
    target = _keyed_dir("tiny-model", params)
    if not target.exists():
        log.info("building the tiny Qwen3-VL into %s", target)
    init = _build_once(target, lambda d: make_tiny_model(d, seed=cfg.model.tiny_seed, **cfg.model.tiny_size))
    return pretrained_tiny_model(cfg, init) if cfg.model.tiny_pretrain_steps else init


def pretrain_config(cfg: Config) -> Config:
    """The run that pretrains the tiny model (model.tiny_pretrain_steps): the embedded default's Stage-1,
    its lr schedule over those steps, seeded by model.tiny_seed, on the model size of ``cfg``."""
    from coordexp_rl.config import load_config

    m = cfg.model
    return load_config(None, [f"stage1.steps={m.tiny_pretrain_steps}", f"run.seed={m.tiny_seed}",
                              f"model.tiny_seed={m.tiny_seed}", f"model.tiny_size={json.dumps(m.tiny_size)}"])


def stage1_settings(cfg: Config) -> dict:
    """Every setting but those Stage-1 never reads (config.STAGE2_ONLY_KEYS, checked by
    tests/deploy/test_ablate.py): the pretrained model's cache key. Any default that changes what Stage-1
    trains gives a new folder; a new Stage-2, evaluation or run setting does not retrain it. The model.lora
    keys join only when LoRA is on (rank > 0): a full fine-tune keeps the folder it had before they existed."""
    lora_off = not cfg.model.lora.rank
    defaults = flat_settings(Config().model_dump())
    return {k: v for k, v in flat_settings(cfg.model_dump()).items()
            if not is_stage2_only(k) and not (lora_off and k.startswith("model.lora."))
            and not (k in LAYOUT_KEYS and v == defaults[k])}


# How the learner lays out its forwards (micro-batches, padding or packing), which attention kernel runs
# them and whether they are compiled: the same loss and gradients up to float rounding. They join
# stage1_settings only when set, so the folders built before they existed keep their names.
LAYOUT_KEYS = ("learner.micro_batch_order", "learner.micro_batch_tokens", "learner.packing",
               "model.attn_implementation", "learner.compile")


def pretrained_tiny_model(cfg: Config, init: Path) -> Path:
    """The tiny model ``init`` after model.tiny_pretrain_steps Stage-1 steps of the default's sparse task
    (``pretrain_config``), in this process, built once into the cache folder. Why: a real run starts from a
    VLM that already names and boxes things; the dense task from random weights would spend its budget
    learning what a shape is (docs/RESULTS.md "Dense scenes")."""
    base = pretrain_config(cfg)
    target = _keyed_dir("tiny-pretrained", stage1_settings(base))
    if not target.exists():
        log.info("pretraining the tiny Qwen3-VL (%d Stage-1 steps of the default task) into %s", base.stage1.steps,
                 target)
    return _build_once(target, lambda d: _pretrain(base, init, d))


def _pretrain(base: Config, init: Path, out: Path) -> None:
    from tqdm import tqdm

    from coordexp_rl.data.loader import load_samples
    from coordexp_rl.data.stream import BatchStream
    from learner.learner import Learner

    train = load_samples(synthetic_set(base) / "train.jsonl")
    learner = Learner(base, init)
    stream = BatchStream(train, base.optim.batch_size, base.run.seed)
    steps, chunk = base.stage1.steps, 100
    with tqdm(total=steps, desc="pretrain", unit="step") as bar:
        for done in range(0, steps, chunk):
            m = learner.stage1_steps(stream.next_batch, min(chunk, steps - done))
            bar.update(len(m))
            bar.set_postfix(loss=f"{m[-1]['loss/total']:.3f}")
    learner.export_pretrained(out)


DENSE_OPTIONS = ("max_pair_iou", "distinct_descs")  # data.synth_<name>; in the cache key only when set


def synth_options(cfg: Config) -> dict:
    """The ``make_synthetic_set`` keywords of ``cfg.data.synth_*`` (all but train / val / seed)."""
    d = cfg.data
    return {"image_size": d.synth_image_size, "min_objects": d.synth_min_objects,
            "max_objects": d.synth_max_objects, "min_size": d.synth_min_size, "max_size": d.synth_max_size,
            "edge_prob": d.synth_edge_prob, "background": d.synth_background, "colours": tuple(d.synth_colours),
            "shapes": tuple(d.synth_shapes), "max_pair_iou": d.synth_max_pair_iou,
            "distinct_descs": d.synth_distinct_descs}


def synthetic_set(cfg: Config) -> Path:
    from coordexp_rl.data.synth import SynthConfig, make_synthetic_set

    d = cfg.data
    options = synth_options(cfg)
    # The dense settings join the cache key only when set: the default's folder keeps its name.
    key = {k: v for k, v in options.items() if k not in DENSE_OPTIONS or v != getattr(SynthConfig(), k)}
    params = {"train": d.synth_train, "val": d.synth_val, "seed": d.synth_seed, **key}
    target = _keyed_dir("synth", params)
    if not target.exists():
        log.info("building the synthetic set into %s", target)
    return _build_once(target, lambda out: make_synthetic_set(
        out, n_train=d.synth_train, n_val=d.synth_val, seed=d.synth_seed, **options))
