"""One typed config tree for a run; every default works on the tiny CPU setting.

Load order: defaults <- YAML file(s), layered in order <- ``key.sub=value`` overrides (values parsed as YAML
scalars).
Unknown keys fail loudly with the dotted path and the file they came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from coordexp_rl.errors import UserError
from coordexp_rl.fault_points import FORMAT as FAULT_FORMAT
from coordexp_rl.fault_points import parse_fault_point

DEFAULT_PROMPT = "Detect all objects. For each, write its description and box."

# Ranges, checked when a config loads (a wrong value is refused naming its key, before anything starts).
Count = Annotated[int, Field(ge=1)]  # steps, batches, sizes that must be at least one
NonNegativeInt = Annotated[int, Field(ge=0)]  # 0 means "off" or "none"
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # rates, temperatures, timeouts, CPUs
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # loss weights, GPUs (0 = off / none)
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # probabilities, IoU and L1 thresholds
PositiveFraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
CoordTopK = Annotated[int, Field(ge=0, le=1000)]  # bins of the 1000 coord tokens; 0 = all


def _custom_resource(name: str) -> str:
    if name in ("CPU", "GPU", "memory", "object_store_memory"):
        raise ValueError(f"{name} is one of Ray's own resources; name a custom one (e.g. coordexp_rollout)")
    return name


# A custom Ray resource name ("" = none), not one of Ray's own.
ResourceName = Annotated[str, Field(pattern=r"^([A-Za-z_][\w\-]*)?$"), AfterValidator(_custom_resource)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    # LoRA adapters instead of a full fine-tune (learner/lora.py, via peft): the base stays frozen, the coord
    # and structure token rows of the embeddings and LM head train, the vision tower per model.freeze_vision
    # (false: trained in full). The rollout engines get the merged weights. 0 = off (full fine-tune).
    rank: NonNegativeInt = 0
    alpha: Positive = 16.0  # the adapters' update is scaled by alpha / rank
    dropout: Fraction = 0.0  # on the adapters' input, training only
    # Linear layers to adapt, by their last name; the default is every projection of the text model's
    # decoder layers (the vision tower's are named qkv, proj, linear_fc1, linear_fc2).
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], min_length=1)


class ModelConfig(_Section):
    path: str = ""  # a Qwen3-VL folder with coord tokens; "" = the tiny model, built on first use
    tiny_seed: int = 0  # seed of the tiny model built when path is ""
    # Overrides of the tiny model's sizes (modeling/tiny.py TinySize); {} = the 1.1 M-parameter base size,
    # which learns the synthetic set in the default's time budget (docs/RESULTS.md).
    tiny_size: dict[str, int] = Field(default_factory=dict)
    # A stand-in for a pretrained VLM: the tiny model first trained this many Stage-1 steps on the embedded
    # default's sparse synthetic task (its loss, optimizer, lr schedule over these steps; seed tiny_seed),
    # built once into the cache folder. 0 = start from random weights. Only with path "".
    tiny_pretrain_steps: NonNegativeInt = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    # The attention kernel of the learner's and the hf engine's transformers model (from_pretrained's
    # attn_implementation; vLLM picks its own): sdpa (torch's scaled_dot_product_attention, transformers' own
    # default), eager (plain matmuls: the reference), or flash_attention_2 (needs a CUDA device, the flash_attn
    # package and dtype bfloat16; refused otherwise; untested on GPUs here). With learner.packing, flash-attention
    # turns the packed row's restarting position ids into varlen sequences (cu_seqlens, no mask), where sdpa and
    # eager get a dense block-diagonal (sum of lengths)^2 mask.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    freeze_vision: bool = False  # keep the vision tower fixed (saves memory on real models)
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(_Section):
    train: str = ""  # contract JSONL; "" = the synthetic set, built on first use
    val: str = ""
    image_root: str = ""  # "" = the JSONL's folder
    train_image_root: str = ""  # image folder of `train` ("" = image_root); COCO: .../train2017
    val_image_root: str = ""  # image folder of `val` ("" = image_root); COCO: .../val2017
    check_images: bool = True  # open every image at start-up (the driver, once); false after `coordexp-rl validate`
    # Image resolution, the same in the learner, both engines, infer and evaluation (docs/DATA_JSONL_CONTRACT.md):
    # Qwen3-VL resizes to multiples of 32 px (patch 16 x merge 2) within these bounds; one image token per
    # 32x32 px, so max_pixels / 1024 bounds the image tokens (65,536 -> 64 tokens).
    max_pixels: Count = 65536
    min_pixels: Count = 4096
    # GT assistant tokens per sample: N objects take N x (10 + description tokens) + 1 (end of turn).
    max_target_tokens: NonNegativeInt = 0  # 0 = rollout.max_new_tokens (a GT the rollout could not write either)
    too_many_objects: Literal["error", "truncate"] = "error"  # truncate: keep whole objects, counted in metrics
    skip_bbox_norm: bool = False  # records hold "<|coord_k|>" strings already (METHOD 3.2)
    prompt: str = DEFAULT_PROMPT
    # The synthetic set built when train is "" (coordexp_rl/data/synth.py): 1-3 shapes of 3 colours x 3
    # kinds (9 descriptions), 20-40 % of the side, on plain backgrounds.
    synth_train: Count = 8000
    synth_val: Count = 256  # >= 256: 64 images (~125 boxes) are too noisy to rank arms
    synth_seed: int = 0
    synth_image_size: Count = 128
    synth_min_objects: Count = 1
    synth_max_objects: Count = 3
    synth_min_size: PositiveFraction = 0.2  # shape side as a fraction of the image side
    synth_max_size: PositiveFraction = 0.4
    synth_edge_prob: Fraction = 0.15  # chance that a shape is pushed against an image edge (bins 0 / 999)
    synth_background: Literal["plain", "noisy", "mixed"] = "plain"
    synth_colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue"])
    synth_shapes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle"])
    # Dense scenes (configs/dense_cpu.yaml; null / 0 = off, the default's set is drawn as before): shapes
    # touch and overlap up to this IoU between any two boxes, and each image's objects repeat N descriptions.
    synth_max_pair_iou: Fraction | None = None
    synth_distinct_descs: NonNegativeInt = 0


class CoordExpConfig(_Section):
    tau_start: Positive = 1.0  # softmax temperature over the 1000 coord logits
    tau_end: Positive = 1.0  # annealed linearly to this over anneal_steps (METHOD 2.5)
    anneal_steps: NonNegativeInt = 0
    top_k: CoordTopK = 0  # 0 = plain expectation; k > 0 = expectation over the k most probable bins


class LossConfig(_Section):
    # Every term is a sum over the batch divided by one number, the batch's total CE weight W, in both
    # stages (coordexp_rl/method/losses.py has the formula): a lambda weighs one unit of its term against one
    # unit of CE weight. An object of 2 description tokens costs W = 2 desc_weight + 6 + 4 (1 +
    # lambda_coord_ce) (+ the end of turn once per image).
    desc_weight: NonNegative = 4.0  # CE weight of description tokens (between <desc> and </desc>), both stages
    lambda_coord_ce: NonNegative = 1.0  # extra CE weight on coord tokens (METHOD 5.3 / 8)
    lambda_coord_ce_stage2: NonNegative | None = None  # the same in Stage-2's reordered-GT CE; None = lambda_coord_ce
    lambda_l1: NonNegative = 4.0  # Stage-1 CoordExp L1, summed over GT coord positions (METHOD 5.3)
    lambda_giou: NonNegative = 8.0  # Stage-1 (1 - GIoU + inversion), summed over GT boxes
    lambda_soft_ce: NonNegative = 0.0  # Stage-1 soft CE over neighbouring bins, summed over coord positions
    soft_ce_sigma: Positive = 2.0  # its Gaussian width in bins
    lambda_w1: NonNegative = 0.0  # Stage-1 Wasserstein-1 to the target bin, summed over coord positions
    lambda_geo: NonNegative = 4.0  # Stage-2 self-context geometric loss, summed over gated pairs (METHOD 8)
    alpha_l1: NonNegative = 1.0  # inside the geometric loss: alpha * L1 + beta * (1 - GIoU + inversion);
    beta_giou: NonNegative = 2.0  # with lambda_geo 4 this equals Stage-1's 4 L1 + 8 GIoU per box
    lambda_entropy: NonNegative = 0.0  # entropy regulariser on coord distributions
    eos_weight: NonNegative = 1.0  # CE weight of the end-of-turn token
    extra_eos_weight: NonNegative = 2.0  # EOS weight when the rollout has more objects than the GT (METHOD 14.3)
    ce_chunk_size: Count = 256  # positions per chunk: full-vocab logits never exist for the whole sequence


class MatchingConfig(_Section):
    geometry: Literal["giou", "iou"] = "giou"
    geo_cost_weight: NonNegative = 1.0  # weight of the geometric cost (L1 + 1 - GIoU) in the Hungarian cost
    semantic: Literal["text", "minilm"] = "text"  # cheap normalised text, or the frozen MiniLM encoder
    sem_cost_weight_start: NonNegative = 0.0  # curriculum: geometry-only and strict first (METHOD 11)
    sem_cost_weight_end: NonNegative = 0.5
    # Gate (METHOD 6.1 step 5): a pair feeds the geometric loss if IoU > iou_thr or mean L1 < l1_thr. Both
    # stay strict: at l1_thr 0.03 only boxes under ~6 % of the side can pass with IoU 0.
    iou_thr_start: Fraction = 0.5
    iou_thr_end: Fraction = 0.3
    l1_thr_start: Fraction = 0.02  # mean per-coordinate L1 in [0, 1] units
    l1_thr_end: Fraction = 0.03
    curriculum_steps: NonNegativeInt = 200
    missing_policy: Literal["append", "drop"] = "append"  # unmatched GT become completion objects


class OptimConfig(_Section):
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    warmup_steps: NonNegativeInt = 500
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: Positive = 1.0
    batch_size: Count = 8  # samples per learner step


class Stage1Config(_Section):
    steps: NonNegativeInt = 8500  # the lr (optim.lr) follows warmup + cosine to 10 % over these steps
    order: Literal["canonical", "random"] = "canonical"


class Stage2Config(_Section):
    steps: NonNegativeInt = 300
    # Stage-2's own constant learning rate. Unset (null), it is lr_ratio x optim.lr: by default where
    # Stage-1's cosine ends (10 % of the peak), whatever model the config sizes optim.lr for. A rate above
    # Stage-1's peak is refused unless allow_lr_above_stage1 (a rate sized for another model wrecks this one).
    lr: Positive | None = None
    lr_ratio: Positive = 0.1
    allow_lr_above_stage1: bool = False
    # "em" = METHOD 6-8; "sft" = the control arm: the same steps, lr and data stream as Stage-1 SFT on the
    # canonical GT, from the same Stage-1 state (answers "does the EM loop beat more SFT?")
    method: Literal["em", "sft"] = "em"
    sync_every: Count = 5  # learner steps between weight syncs
    # Switches that isolate the method's parts (ablations; METHOD 7): the CE path's GT in the rollout's order
    # ("reordered", METHOD 7.2), in it only where the gate admitted the pair ("gated": the other GT follow in
    # canonical order) or in the canonical order; the geometric loss on the rollout's own tokens ("self",
    # METHOD 7.1) or on the same gated pairs teacher-forced on that GT sequence ("gt"); gt_geometry adds
    # Stage-1's geometric loss on every box of the CE path's GT sequence (lambda_geo, alpha_l1, beta_giou).
    gt_order: Literal["reordered", "gated", "canonical"] = "reordered"
    geo_context: Literal["self", "gt"] = "self"
    gt_geometry: bool = False
    # Synchronous, on-policy Stage-2 in a fixed order, so that two runs of one seed agree step for step: one
    # rollout actor generates exactly the learner's next batch with the current weights, in its shard order.
    # load_config requires rollout.num_actors=1, buffer.max_staleness=0, stage2.sync_every=1 and
    # rollout.batch_size=optim.batch_size with it; the learner checks every Stage-2 batch (ray_learner.py).
    reproducible: bool = False


def stage2_lr(cfg: "Config") -> float:
    """Stage-2's constant learning rate: ``stage2.lr``, or ``stage2.lr_ratio`` x ``optim.lr`` when unset."""
    return cfg.stage2.lr if cfg.stage2.lr is not None else cfg.stage2.lr_ratio * cfg.optim.lr


class RolloutConfig(_Section):
    engine: Literal["vllm", "hf"] = "vllm"
    num_actors: Count = 1
    batch_size: Count = 8  # requests per engine call
    temperature: NonNegative = 0.0  # 0 = greedy
    top_p: PositiveFraction = 1.0
    top_k: NonNegativeInt = 0  # 0 = off
    # 1.0 = rollouts decode as evaluation does. vLLM applies a penalty to prompt and output tokens alike
    # (every repeated colour word, structure token, end of turn), so it is off by default.
    repetition_penalty: Positive = 1.0
    # Stage-2 rollouts per training image, generated in a row (more hypotheses per image in a batch, each
    # matched and learned from); more than 1 needs temperature > 0, since greedy copies are identical.
    per_image: Count = 1
    max_new_tokens: Count = 96
    seed: int = 0
    max_model_len: Count = 1024
    max_num_seqs: Count = 8
    gpu_memory_utilization: PositiveFraction = 0.85
    tensor_parallel_size: Count = 1
    # vLLM without CUDA graphs / compile: right on CPU (no graphs; a cold compile costs 10-15 s per start);
    # GPU configs set false, since graphs speed up decoding of small batches.
    enforce_eager: bool = True
    gpus_per_actor: NonNegative = 0.0  # 0 on CPU machines
    cpus_per_actor: Positive = 1.0
    max_restarts: NonNegativeInt = 3  # Ray restarts a dead rollout actor this often (it reloads the newest weights)
    gone_timeout_s: Positive = 300.0  # every actor dead this long: the driver checkpoints and stops
    # A custom Ray resource each rollout bundle asks 1 of: the actors go only to nodes that declare it
    # (e.g. coordexp_rollout on spot GPU nodes; deploy/ray_cluster.yaml, docs/DEPLOY.md). "" = any node.
    node_resource: ResourceName = ""


class BufferConfig(_Section):
    capacity: Count = 64  # rows; producers block when full
    max_staleness: NonNegativeInt = 1  # weight versions; 0 = on-policy
    spill_dir: str = ""  # "" = no Parquet spill; relative paths live in the run folder
    max_restarts: NonNegativeInt = 3  # Ray restarts a dead buffer this often; the rows it held are generated again


class WeightSyncConfig(_Section):
    transport: Literal["object_store", "broadcast"] = "object_store"
    bucket_mb: Count = 64
    timeout_s: Positive = 120.0


class LearnerConfig(_Section):
    world_size: Count = 1  # learner ranks, one process each; gpus/cpus below are per rank
    gpus: NonNegative = 0.0
    cpus: Positive = 1.0
    sharding: Literal["replicate", "fsdp"] = "replicate"  # whole model per rank, or FSDP2 shards
    accum_steps: Count = 1  # micro-batches per optimizer step per rank
    activation_checkpointing: bool = False  # recompute decoder activations in backward (saves memory)
    # torch.compile each decoder layer (inductor, dynamic shapes: lengths change every step). The first step
    # pays the compile (about a minute for the tiny model on 2 CPU cores); whether it pays on GPUs is what
    # the GPU check's train_compiled step measures (docs/DEPLOY.md). Off in every shipped config.
    compile: bool = False
    # How a rank's sequences form its micro-batches; these three change only speed and memory, never the
    # loss or gradients (every loss is a sum over the micro-batch / a global normaliser; learner/batching.py).
    # "length": sorted by token count before the split into accum_steps micro-batches, so each pads to
    # similar lengths (fewer pad tokens when accum_steps > 1); "given": in batch order.
    micro_batch_order: Literal["given", "length"] = "given"
    # A token budget per micro-batch instead of accum_steps micro-batches (keep accum_steps 1): sequences in
    # length order join a micro-batch while its forward stays within this many tokens (padded: count x the
    # longest; packed: the sum); a longer sequence goes alone. Every rank runs as many micro-batches as the
    # rank that needs the most (one that has fewer repeats a forward with its loss x 0). 0 = off.
    micro_batch_tokens: NonNegativeInt = 0
    # Each micro-batch's sequences in one row without padding (modeling/inputs.py pack): position ids restart
    # per sequence (M-RoPE ids per sequence), the causal mask is block-diagonal (transformers reads the
    # restarts; flash-attention runs varlen). No pad tokens, but on sdpa/eager the mask is dense: the
    # attention costs (sum of lengths)^2 per micro-batch, not count x longest^2 (measured: docs/BENCHMARKS.md).
    packing: bool = False
    # A custom Ray resource each learner rank's bundle asks 1 of (e.g. coordexp_learner on on-demand nodes,
    # so that the optimizer state never sits on spot capacity). "" = any node.
    node_resource: ResourceName = ""
    # A dead learner rank (an OOM kill, an NCCL error): the driver re-forms the group from the newest complete
    # checkpoint this often per run, within the job; then (or with no checkpoint yet) the job ends with its
    # resume command.
    max_restarts: NonNegativeInt = 2


class EvalConfig(_Section):
    # Evaluation runs before Stage-1, after Stage-1 and after Stage-2, through the rollout actors (their
    # engine, rollout.engine, with the current weights), greedy with rollout.max_new_tokens.
    max_samples: Count = 256  # the first N validation samples
    # After Stage-1 and Stage-2: the learner's teacher-forced box IoU on the same images (one no-grad forward
    # per GT sequence), beside the free-running one: eval/exposure/... (coordexp_rl/evaluation/exposure.py)
    exposure: bool = True
    # Learning curves: every N learner steps (both stages) the weights go to the rollout actors and are scored
    # on the first every_samples validation samples (eval/step-000300/, logged as eval rows). In Stage-1 (and
    # the SFT control's Stage-2) the actors are idle and score in a thread beside training; in the EM loop
    # they stop generating for it, so the learner waits. 0 = off.
    every: NonNegativeInt = 0
    every_samples: Count = 200
    # A headline metric of the evaluations (e.g. object_prob/AP50; higher is better): the checkpoint of the
    # best curve point (eval.every) is kept beyond run.keep_last, named in checkpoints/best.json. "" = off.
    best_metric: str = ""


class RunConfig(_Section):
    out_dir: str = Field("runs/default", min_length=1)
    # A folder holding another run is refused unless this run resumes it (resume) or replaces it: true
    # removes the earlier run's outputs first (coordexp_rl/driver/run_folder.py).
    overwrite: bool = False
    seed: int = 0
    log_every: Count = 10
    checkpoint_every: NonNegativeInt = 1000  # 0 = only the final one
    resume: str = ""  # a checkpoint folder to continue from; "auto" = the newest complete one in out_dir (if any)
    keep_last: NonNegativeInt = 3  # complete checkpoints kept on disk (oldest removed first); 0 = keep all
    # On a cluster the launch joined: how long to wait for its placement groups (nodes joining, an
    # autoscaler adding them) before it stops with the knobs to change. A local Ray refuses at once.
    # A learner re-formed after its node was lost waits as long for a node to join, then stops (exit 5).
    placement_timeout_s: Positive = 600.0
    ray_address: str = ""  # "" = join the cluster `ray job submit` provides, else start a local one
    # Where metrics go besides metrics.jsonl (always written: resume and the reports read it): tensorboard,
    # wandb, mlflow (coordexp_rl/driver/trackers.py; e.g. 'run.loggers=[jsonl,wandb,mlflow]').
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = ["jsonl", "tensorboard"]
    # Fault injection, to rehearse recovery: ROLE@STAGE:STEP points (one, or a list), e.g. learner@stage2:120,
    # buffer@stage2:50, rollout@stage2:30: that process SIGKILLs itself after that step of the stage, once
    # per run (coordexp_rl/fault_points.py). [] = none.
    fail_at: list[str] = []

    @field_validator("fail_at", mode="before")
    @classmethod
    def _fault_points(cls, v: Any) -> list[str]:
        points = [v] if isinstance(v, str) else v
        if not isinstance(points, list):
            raise ValueError(f"expected a point ({FAULT_FORMAT}) or a list of them, got {v!r}")
        return [parse_fault_point(str(p)).spec for p in points if str(p).strip()]

    @field_validator("loggers")
    @classmethod
    def _jsonl_kept(cls, v: list[str]) -> list[str]:
        if "jsonl" not in v:
            raise ValueError("must include jsonl (metrics.jsonl is the run's own record: resume, report.md and "
                             "the plots read it)")
        return list(dict.fromkeys(v))


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    coordexp: CoordExpConfig = Field(default_factory=CoordExpConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    matching: MatchingConfig = Field(default_factory=MatchingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)


# Keys that leave Stage-1's weights bit-identical: only Stage-2, the rollout side, evaluation or the run's
# bookkeeping read them. A bare section name stands for every key of that section. `coordexp-rl ablate`
# starts an arm that differs from its default only in these keys from the default's Stage-1 checkpoint of
# the same seed. Not here because Stage-1 reads them too: loss.eos_weight, loss.desc_weight and
# loss.lambda_coord_ce (the GT sequences' CE weights), rollout.max_new_tokens (data.max_target_tokens=0
# means it). tests/deploy/test_ablate.py checks that the learner's Stage-1 reads none of them and trains to
# the same weights with all of them changed.
STAGE2_ONLY_KEYS = (
    "stage2", "matching", "buffer", "weight_sync", "eval",
    "loss.lambda_geo", "loss.alpha_l1", "loss.beta_giou", "loss.lambda_entropy",  # Stage-2's coord_terms
    "loss.lambda_coord_ce_stage2",  # Stage-2's GT sequences only (SequenceBuilder.gt_sequence(stage2=True))
    "loss.extra_eos_weight",  # Stage-2 targets of a rollout that over-generated
    "rollout.engine", "rollout.num_actors", "rollout.batch_size", "rollout.temperature", "rollout.top_p",
    "rollout.top_k", "rollout.repetition_penalty", "rollout.seed", "rollout.per_image",
    "run.out_dir", "run.log_every", "run.keep_last", "run.overwrite", "run.placement_timeout_s", "run.loggers",
    "rollout.node_resource", "learner.node_resource",  # where the processes run, not what they compute
    "run.fail_at", "learner.max_restarts",  # faults and their recovery: Stage-1 after a restart is the same
)


def flat_settings(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config tree (``Config.model_dump()`` or a YAML mapping) as dotted keys -> values; the mapping
    ``model.tiny_size`` stays one value."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "tiny_size":
            out.update(flat_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(a: dict, b: dict) -> list[str]:
    """The dotted keys whose values differ between two config trees, sorted."""
    fa, fb = flat_settings(a), flat_settings(b)
    return [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def is_stage2_only(key: str) -> bool:
    """Whether the dotted ``key`` is in STAGE2_ONLY_KEYS (by itself or through its section)."""
    return key in STAGE2_ONLY_KEYS or key.split(".", 1)[0] in STAGE2_ONLY_KEYS


class ConfigError(UserError):
    kind = "config error"


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None
                ) -> Config:
    """Defaults <- YAML ``path`` <- ``["optim.lr=3e-4", ...]``; raises ConfigError naming the key.

    ``path``: one YAML file, or several layered in order (a later file's keys win; a key's value is
    replaced whole, sections merge). A problem is reported with the file that set the key.
    """
    files = [path] if isinstance(path, (str, Path)) else list(path or [])
    files = [Path(f) for f in files if f]
    source = " <- ".join(map(str, files)) or "defaults"
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}  # dotted key (or section) -> the file that set it last
    for f in files:
        for section, keys in _read_yaml(f).items():
            if isinstance(keys, dict) and isinstance(raw.get(section), dict):
                raw[section] = {**raw[section], **keys}
            else:
                raw[section] = keys
            origins[section] = str(f)
            origins.update({f"{section}.{k}": str(f) for k in keys} if isinstance(keys, dict) else {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value else "")
        origins[key.strip()] = "override"
        origins.setdefault(key.strip().split(".")[0], "override")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_problem(err, origins if len(files) > 1 else {}) for err in e.errors())
        raise ConfigError(f"{source} (+ overrides {overrides or []}): {problems}") from None
    ranks = cfg.learner.world_size * cfg.learner.accum_steps
    if cfg.optim.batch_size < ranks:
        raise ConfigError(f"{source}: optim.batch_size={cfg.optim.batch_size} is the global batch; it must be >= "
                          f"learner.world_size x learner.accum_steps = {ranks}")
    if cfg.learner.micro_batch_tokens and cfg.learner.accum_steps > 1:
        raise ConfigError(f"{source}: learner.micro_batch_tokens={cfg.learner.micro_batch_tokens} forms the "
                          f"micro-batches under a token budget, learner.accum_steps={cfg.learner.accum_steps} "
                          "as a fixed count; set one of them (accum_steps=1 or micro_batch_tokens=0)")
    if cfg.model.attn_implementation == "flash_attention_2" and cfg.model.dtype != "bfloat16":
        # the learner keeps float32 weights and autocasts only for bfloat16: flash_attn refuses float32 inputs
        raise ConfigError(f"{source}: model.attn_implementation=flash_attention_2 runs in half precision only, "
                          f"model.dtype={cfg.model.dtype}; set model.dtype=bfloat16 or model.attn_implementation=sdpa")
    _check_token_budget(cfg, source)
    _check_reproducible(cfg, source)
    if cfg.model.lora.rank and cfg.learner.sharding == "fsdp":
        raise ConfigError(f"{source}: model.lora.rank={cfg.model.lora.rank} with learner.sharding=fsdp is not "
                          "supported; LoRA's frozen base fits replicated (learner.sharding=replicate; --dry-run "
                          "shows the memory per device)")
    if cfg.model.path and cfg.model.tiny_pretrain_steps:
        raise ConfigError(f"{source}: model.tiny_pretrain_steps={cfg.model.tiny_pretrain_steps} pretrains the tiny "
                          f"model, but model.path={cfg.model.path} names a real one; set one of them")
    _check_pairs(cfg, source)
    _check_fault_points(cfg, source)
    if stage2_lr(cfg) > cfg.optim.lr and not cfg.stage2.allow_lr_above_stage1:
        raise ConfigError(f"{source}: stage2.lr={cfg.stage2.lr} is above Stage-1's peak optim.lr={cfg.optim.lr}; "
                          "leave stage2.lr unset (stage2.lr_ratio x optim.lr, by default where Stage-1's cosine "
                          "ends) or set stage2.allow_lr_above_stage1=true")
    if cfg.stage2.gt_geometry and cfg.stage2.geo_context == "gt":
        raise ConfigError(f"{source}: stage2.gt_geometry=true puts the geometric loss on every GT box, "
                          "stage2.geo_context=gt on the gated pairs' only; set one of them")
    steps = cfg.stage1.steps + cfg.stage2.steps
    if cfg.eval.best_metric and not cfg.eval.every:
        raise ConfigError(f"{source}: eval.best_metric={cfg.eval.best_metric} picks among the curve points of "
                          "eval.every, which is 0 (off); set eval.every")
    if cfg.eval.every and steps and cfg.eval.every >= steps:
        raise ConfigError(f"{source}: eval.every={cfg.eval.every} must be below stage1.steps + stage2.steps = "
                          f"{steps} (the evaluations after each stage are always made); 0 turns it off")
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def _check_pairs(cfg: Config, source: str) -> None:
    """Settings that are each in range but do not fit together."""
    d = cfg.data
    for low, high in (("synth_min_objects", "synth_max_objects"), ("synth_min_size", "synth_max_size")):
        if getattr(d, low) > getattr(d, high):
            raise ConfigError(f"{source}: data.{low}={getattr(d, low)} > data.{high}={getattr(d, high)}")
    if cfg.rollout.per_image > 1 and cfg.rollout.temperature == 0:
        raise ConfigError(f"{source}: rollout.per_image={cfg.rollout.per_image} with rollout.temperature=0 "
                          "generates identical greedy copies; set rollout.temperature > 0")
    if cfg.stage2.steps and cfg.stage2.method == "em" and cfg.buffer.capacity < cfg.optim.batch_size:
        # the learner takes optim.batch_size rows per Stage-2 step: a smaller buffer never fills
        raise ConfigError(f"{source}: buffer.capacity={cfg.buffer.capacity} < optim.batch_size="
                          f"{cfg.optim.batch_size}: a Stage-2 step takes optim.batch_size rows from the buffer")


def _check_fault_points(cfg: Config, source: str) -> None:
    """A run.fail_at point the run never reaches would silently rehearse nothing."""
    for spec in cfg.run.fail_at:
        point = parse_fault_point(spec)
        steps = getattr(cfg, point.stage).steps
        if point.step > steps or (point.role == "learner" and point.step == steps):
            raise ConfigError(f"{source}: run.fail_at={spec}: {point.stage} has {point.stage}.steps={steps} steps; "
                              f"pick a step inside it{' before its last' if point.role == 'learner' else ''}")
        if point.stage == "stage2" and point.role != "learner" and cfg.stage2.method != "em":
            raise ConfigError(f"{source}: run.fail_at={spec}: stage2.method={cfg.stage2.method} uses no "
                              f"{point.role} in Stage-2; fail the learner instead")


def _check_reproducible(cfg: Config, source: str) -> None:
    """stage2.reproducible: one actor, on-policy, a sync after every step and one engine call per learner
    batch, so that the actor generates exactly the learner's next batch with its current weights (the buffer
    admits optim.batch_size x stage2.sync_every rows per weight version, actors/buffer.py). The keys are
    required, not set behind the user's back: the error names each one to change."""
    if not cfg.stage2.reproducible:
        return
    need = {"rollout.num_actors": 1, "buffer.max_staleness": 0, "stage2.sync_every": 1,
            "rollout.batch_size": cfg.optim.batch_size}  # = optim.batch_size
    got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in need}
    wrong = [k for k in need if got[k] != need[k]]
    if wrong:
        raise ConfigError(f"{source}: stage2.reproducible=true needs " + " ".join(f"{k}={need[k]}" for k in wrong)
                          + " (rollout.batch_size = optim.batch_size); got "
                          + ", ".join(f"{k}={got[k]}" for k in wrong))


# Keys renamed since they were released: an old config is refused with the new name.
RENAMED = {"matching.lambda_geo": "matching.geo_cost_weight",  # loss.lambda_geo is the Stage-2 loss weight
           "matching.lambda_sem_start": "matching.sem_cost_weight_start",
           "matching.lambda_sem_end": "matching.sem_cost_weight_end"}


def _problem(err: dict, origins: dict[str, str] | None = None) -> str:
    """``key: message``; with ``origins`` (several files), prefixed by the file (or override) that set it."""
    key = ".".join(str(p) for p in err["loc"])
    hint = f" (renamed: use {RENAMED[key]})" if key in RENAMED else ""
    origin = next((origins[k] for k in (key, key.split(".")[0]) if k in (origins or {})), None)
    return f"{origin + ': ' if origin else ''}{key}: {err['msg']}{hint}"


QWEN3VL_PIXELS_PER_TOKEN = 32 * 32  # patch 16 x spatial merge 2


def _check_token_budget(cfg: Config, source: str) -> None:
    """Image tokens at data.max_pixels + rollout.max_new_tokens must fit rollout.max_model_len.

    The prompt text adds a few dozen tokens more; the exact count per sample is checked at data load.
    """
    d, r = cfg.data, cfg.rollout
    if d.min_pixels > d.max_pixels:
        raise ConfigError(f"{source}: data.min_pixels={d.min_pixels} > data.max_pixels={d.max_pixels}")
    image_tokens = d.max_pixels // QWEN3VL_PIXELS_PER_TOKEN
    if image_tokens + r.max_new_tokens >= r.max_model_len:
        raise ConfigError(
            f"{source}: data.max_pixels={d.max_pixels} allows {image_tokens} image tokens; with "
            f"rollout.max_new_tokens={r.max_new_tokens} that leaves no room for the prompt text in "
            f"rollout.max_model_len={r.max_model_len}: raise rollout.max_model_len to at least "
            f"{image_tokens + r.max_new_tokens + 64}, or lower data.max_pixels / rollout.max_new_tokens")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
