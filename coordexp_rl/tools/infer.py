"""`coordexp-rl infer --model DIR --data FILE.jsonl --out preds.jsonl`: predictions for a JSONL file.

The command around ``coordexp_rl.rollout.predict`` (what a line holds, the scores, the decodes are described
there). A driver like ``coordexp_rl.launch``: it builds the engine (``actors.engines.make_engine``).
Settings come from a run's ``--config`` (its in-run evaluation's), else from the config's defaults
(``coordexp_rl.config``); a flag given on the command line wins over both.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from coordexp_rl.config import Config
from coordexp_rl.data.loader import Sample
from coordexp_rl.errors import refuse_overwrite
from coordexp_rl.rollout.engine import DecoderModel
from coordexp_rl.rollout.predict import DECODES, SCORE_MODES, predict, resume_done_ids, write_predictions
from coordexp_rl.tools.export import model_folder

# flag dest -> its value in a run's Config (`--config FILE`, the in-run evaluation's settings). Without
# --config the config's defaults fill them, except _NONE_WITHOUT_CONFIG, which stay None there: the model
# folder's pixel bounds, the data file's folder, one engine sequence per --batch-size request.
_SETTINGS = {
    "engine": lambda c: c.rollout.engine,
    "batch_size": lambda c: c.rollout.batch_size,
    "max_new_tokens": lambda c: c.rollout.max_new_tokens,
    "prompt": lambda c: c.data.prompt,
    "skip_bbox_norm": lambda c: c.data.skip_bbox_norm,
    "dtype": lambda c: c.model.dtype,
    "device": lambda c: "cuda" if c.rollout.gpus_per_actor else "cpu",
    "max_model_len": lambda c: c.rollout.max_model_len,
    "max_num_seqs": lambda c: c.rollout.max_num_seqs,
    "gpu_memory_utilization": lambda c: c.rollout.gpu_memory_utilization,
    "tensor_parallel_size": lambda c: c.rollout.tensor_parallel_size,
    "max_pixels": lambda c: c.data.max_pixels,
    "min_pixels": lambda c: c.data.min_pixels,
    "image_root": lambda c: c.data.val_image_root or c.data.image_root or None,
}
_NONE_WITHOUT_CONFIG = ("max_pixels", "min_pixels", "image_root", "max_num_seqs")
_D = Config().rollout  # the defaults named in --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Qwen3-VL folder with coord tokens, or a "
                        "run's checkpoint folder (exported to a temporary folder first: coordexp-rl export)")
    parser.add_argument("--data", required=True, type=Path, help="contract JSONL to predict on")
    parser.add_argument("--out", required=True, type=Path, help="predictions JSONL (appended; reruns resume)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a run's config.yaml: decoding settings as in that run's evaluation (rollout.engine, "
                             "batch_size, max_new_tokens, max_model_len, max_num_seqs, gpu_memory_utilization, "
                             "tensor_parallel_size, model.dtype, data.prompt/max_pixels/min_pixels/val_image_root); "
                             "flags given here override it")
    parser.add_argument("--engine", choices=("vllm", "hf"), help=f"generation engine (default {_D.engine})")
    parser.add_argument("--decode", choices=DECODES, default="discrete",
                        help="discrete: bins k/1000; coordexp: expectation over the coord logits")
    parser.add_argument("--score", choices=SCORE_MODES, default="prob",
                        help="prob: mean token probability; constant: 1.0")
    parser.add_argument("--batch-size", type=int, help=f"requests per engine call (default {_D.batch_size})")
    parser.add_argument("--max-new-tokens", type=int, help=f"generation length limit (default {_D.max_new_tokens})")
    parser.add_argument("--prompt", help="the user instruction (default: the training default)")
    parser.add_argument("--image-root", type=Path, help="image folder (default: the data file's)")
    parser.add_argument("--skip-bbox-norm", action="store_const", const=True,
                        help="the data file holds '<|coord_k|>' coordinates (as in the training config)")
    parser.add_argument("--dtype", help="torch dtype name (default float32; bfloat16 on GPUs)")
    parser.add_argument("--device", help="HF engine / coordexp decoder device (default cpu)")
    parser.add_argument("--max-model-len", type=int,
                        help=f"vLLM: prompt + generated tokens (default {_D.max_model_len})")
    parser.add_argument("--max-num-seqs", type=int, help="vLLM: sequences decoded together (default: --batch-size)")
    parser.add_argument("--gpu-memory-utilization", type=float,
                        help=f"vLLM on GPUs: share of device memory ({_D.gpu_memory_utilization})")
    parser.add_argument("--tensor-parallel-size", type=int,
                        help=f"vLLM tensor parallelism (default {_D.tensor_parallel_size})")
    parser.add_argument("--max-pixels", type=int, help="image resize upper bound (default: the model folder's)")
    parser.add_argument("--min-pixels", type=int, help="image resize lower bound (default: the model folder's)")


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset flag from ``--config`` (if given), else from the config's defaults; in place."""
    from coordexp_rl.config import load_config

    cfg = load_config(args.config)  # None: the defaults
    for name, from_cfg in _SETTINGS.items():
        if getattr(args, name, None) is None:
            keep_none = args.config is None and name in _NONE_WITHOUT_CONFIG
            setattr(args, name, None if keep_none else from_cfg(cfg))
    args.max_num_seqs = args.max_num_seqs or args.batch_size
    args.image_root = Path(args.image_root) if args.image_root else None
    return args


def run(args: argparse.Namespace) -> int:
    with model_folder(args.model) as args.model:  # a run's checkpoint folder is exported first
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from coordexp_rl.data.loader import DataError, load_samples

    try:
        refuse_overwrite(args.out, force=True, inputs=(args.data,))  # appended to, never onto its input
        resolve_settings(args)
        samples = load_samples(args.data, args.image_root, skip_bbox_norm=args.skip_bbox_norm)
        if args.engine == "vllm":  # a prompt + max_new_tokens over max_model_len fails mid-run in vLLM: check now
            _check_lengths(args, samples)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        done = resume_done_ids(args.out)
    except (OSError, ValueError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    todo = [s for s in samples if s.sample_id not in done]
    foreign = done - {s.sample_id for s in samples}
    if foreign:
        print(f"warning: {args.out} holds {len(foreign)} lines of samples not in {args.data} (first "
              f"{sorted(foreign)[0]!r}); `coordexp-rl eval` will reject them: use a fresh --out", file=sys.stderr)
    print(f"{len(samples)} records, {len(samples) - len(todo)} already in {args.out}, {len(todo)} to predict",
          file=sys.stderr)
    counts = _predict_to_file(args, todo) if todo else Counter()
    print(json.dumps({"out": str(args.out), "written": sum(counts.values()), "skipped": len(samples) - len(todo),
                      "parse_status": dict(counts)}))
    return 0


def _check_lengths(args: argparse.Namespace, samples: list[Sample]) -> None:
    from coordexp_rl.data.limits import check_prompt_budget
    from coordexp_rl.data.loader import DataError
    from coordexp_rl.modeling.load import load_processor

    processor = load_processor(args.model, args.max_pixels, args.min_pixels)
    try:
        check_prompt_budget(samples, processor, args.prompt, args.max_new_tokens, args.max_model_len, args.data)
    except DataError as exc:
        raise DataError(f"{exc} (here: --max-new-tokens, --max-model-len, --max-pixels, or the --config's)") from None


def _predict_to_file(args: argparse.Namespace, todo: list[Sample]) -> Counter:
    from tqdm import tqdm

    from actors.engines import make_engine
    from coordexp_rl.rollout.engine import EngineConfig

    engine = make_engine(EngineConfig(str(args.model), kind=args.engine, dtype=args.dtype, device=args.device,
                                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                      gpu_memory_utilization=args.gpu_memory_utilization,
                                      tensor_parallel_size=args.tensor_parallel_size, max_pixels=args.max_pixels,
                                      min_pixels=args.min_pixels))
    try:
        decoder = None
        if args.decode == "coordexp" and engine.own_decoder() is None:  # vLLM: an HF copy of the weights
            from coordexp_rl.modeling.load import load_model_and_processor

            decoder = DecoderModel(*load_model_and_processor(args.model, args.dtype, args.device,
                                                             max_pixels=args.max_pixels, min_pixels=args.min_pixels))
            decoder.model.eval()
        records = predict(engine, todo, args.prompt, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, decode=args.decode, decoder_model=decoder,
                          score_mode=args.score)
        with tqdm(total=len(todo), desc="infer", unit="img") as bar:
            return write_predictions(records, args.out, progress=bar)
    finally:
        engine.close()
