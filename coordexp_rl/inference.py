"""Inference (SPEC 9): `coordexp-rl infer --model DIR --data FILE.jsonl --out preds.jsonl`.

Greedy generation for every record, parsing of the generated ids, coord bins -> pixel boxes, one
prediction line per input record (an unparseable output is a line with empty ``objects``, never dropped).
Lines are appended and flushed as they complete; a rerun skips records already in ``--out`` (matched by
``sample_id``) and first repairs a last line cut short by a crash.

Each line: the contract fields (``images``, ``width``, ``height``, ``objects`` with ``desc``, pixel
``bbox_2d``, ``score``, ``score_desc``, ``score_object``) plus ``sample_id``, ``parse_status``, ``parse_reasons``,
``finish_reason`` and ``num_tokens``.

Scores: ``score`` is the mean probability of the object's 4 coord tokens, ``score_desc`` the mean
probability of its description tokens, ``score_object`` the product of the probabilities of its description
and coord tokens (the model's probability of writing this description with this box, so a box under a
doubtful name ranks low); all from the engine's raw log-probs (with greedy decoding that is the model's own
probability of the token it chose). ``--score constant`` writes 1.0 for all three.

Decodes: ``discrete`` reads the bins (``k / 1000``); ``coordexp`` runs one teacher-forced forward of the
HF model on prompt + generated ids and takes the CoordExp expectation at each coord position.

This module is a driver: it imports the engines (inside functions) but never Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

from coordexp_rl.coords import CoordVocab, bins_to_pixels
from coordexp_rl.data.loader import Sample, load_image
from coordexp_rl.protocol import ParsedObject, ParseResult, parse_ids

log = logging.getLogger(__name__)

DECODES = ("discrete", "coordexp")
SCORE_MODES = ("prob", "constant")


class DecoderModel(NamedTuple):
    """The HF model used by ``decode="coordexp"``: ``DecoderModel(*load_model_and_processor(DIR))``."""

    model: object  # Qwen3VLForConditionalGeneration
    processor: object
    vocab: CoordVocab


# ----------------------------------------------------------------------------------------------------
# One generation result -> one prediction record
# ----------------------------------------------------------------------------------------------------

def mean_prob(logprobs: Sequence[float], positions: Iterable[int]) -> float | None:
    """Mean of ``exp(logprobs[t])`` over ``positions``; None when there are none.

    >>> round(mean_prob([math.log(0.5), 0.0, math.log(0.25)], [0, 2]), 4)
    0.375
    """
    probs = [math.exp(logprobs[t]) for t in positions]
    return sum(probs) / len(probs) if probs else None


def joint_prob(logprobs: Sequence[float], positions: Iterable[int]) -> float | None:
    """``exp(sum logprobs[t])`` over ``positions``: the probability of all those tokens together.

    >>> joint_prob([math.log(0.5), 0.0, math.log(0.25)], [0, 2])
    0.125
    """
    positions = list(positions)
    return math.exp(sum(logprobs[t] for t in positions)) if positions else None


def desc_positions(ids: Sequence[int], obj: ParsedObject, vocab: CoordVocab) -> range:
    """Positions of the description text tokens of a parsed object (between <desc> and </desc>).

    The record is ``<obj> <desc> d.. </desc> <box> c1 ...``: ``</desc>`` sits 2 before the first coord.
    A description holds no structure token, so the nearest ``<desc>`` before it opens this record.
    """
    close = obj.coord_positions[0] - 2
    open_ = close - 1
    while open_ >= 0 and ids[open_] != vocab.desc_open:
        open_ -= 1
    return range(open_ + 1, close)


def object_record(obj: ParsedObject, box_px: Sequence[float], score: float | None,
                  score_desc: float | None, score_object: float | None = None) -> dict:
    return {"desc": obj.desc, "bbox_2d": [round(float(v), 3) for v in box_px],
            "score": score, "score_desc": score_desc, "score_object": score_object}


def prediction_record(sample: Sample, result, parsed: ParseResult, vocab: CoordVocab, *,
                      unit_boxes: Sequence[Sequence[float]] | None = None, score_mode: str = "prob") -> dict:
    """One prediction line for ``sample`` from its ``GenerationResult`` and the parse of its ids.

    ``unit_boxes``: per parsed object a continuous ``[0, 1]`` box (CoordExp); None = the discrete bins.
    """
    objects = []
    for i, obj in enumerate(parsed.objects):
        if unit_boxes is None:
            box = bins_to_pixels(obj.bins, sample.width, sample.height)
        else:
            x1, y1, x2, y2 = unit_boxes[i]
            box = (x1 * sample.width, y1 * sample.height, x2 * sample.width, y2 * sample.height)
        if score_mode == "constant":
            score = score_desc = score_object = 1.0
        else:
            desc = desc_positions(result.generated_ids, obj, vocab)
            score = mean_prob(result.logprobs, obj.coord_positions)
            score_desc = mean_prob(result.logprobs, desc)
            score_object = joint_prob(result.logprobs, [*desc, *obj.coord_positions])
        objects.append(object_record(obj, box, score, score_desc, score_object))
    return {
        "images": [sample.image_rel], "width": sample.width, "height": sample.height, "objects": objects,
        "sample_id": sample.sample_id, "parse_status": parsed.status, "parse_reasons": parsed.reasons,
        "finish_reason": result.finish_reason, "num_tokens": len(result.generated_ids),
    }


# ----------------------------------------------------------------------------------------------------
# CoordExp decode: one teacher-forced forward on prompt + generated ids
# ----------------------------------------------------------------------------------------------------

def coordexp_unit_boxes(decoder: DecoderModel, images: Sequence, prompt: str, results: Sequence,
                        parsed: Sequence[ParseResult]) -> list[list[tuple[float, ...]]]:
    """Per result, per parsed object, the CoordExp ``[0, 1]`` box (tau = 1, all 1000 bins).

    The hidden state at position ``t - 1`` predicts token ``t``, so a coord token at generated index
    ``j`` is decoded from the hidden state at ``prompt_len + j - 1``.
    """
    import torch

    from coordexp_rl.coordexp import coordexp
    from coordexp_rl.modeling.inputs import collate, encode_example

    model, processor, vocab = decoder
    todo = [i for i, p in enumerate(parsed) if p.objects]
    boxes: list[list[tuple[float, ...]]] = [[] for _ in results]
    if not todo:
        return boxes
    encs = [encode_example(processor, images[i], prompt, results[i].generated_ids) for i in todo]
    pad_id = processor.tokenizer.pad_token_id or 0
    batch = {k: v.to(model.device) for k, v in collate(encs, pad_id).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state  # (B, L, H)
        for row, (i, enc) in enumerate(zip(todo, encs)):
            pos = [enc["prompt_len"] + t - 1 for o in parsed[i].objects for t in o.coord_positions]
            out = coordexp(hidden[row, pos], model.lm_head.weight, vocab.coord_ids)  # (4N,)
            values = out.expectation.float().view(-1, 4).tolist()
            boxes[i] = [tuple(v) for v in values]
    return boxes


# ----------------------------------------------------------------------------------------------------
# Library API
# ----------------------------------------------------------------------------------------------------

def engine_tokenizer(engine, decoder_model: DecoderModel | None = None):
    """The tokenizer used to parse: the decoder's, else the engine's processor's."""
    processor = decoder_model.processor if decoder_model is not None else getattr(engine, "processor", None)
    if processor is None:
        raise ValueError(f"engine {getattr(engine, 'name', engine)!r} has no .processor; pass decoder_model")
    return processor.tokenizer


def default_decoder(engine) -> DecoderModel:
    """The HF engine's own model, for ``decode="coordexp"``; other engines need an explicit decoder."""
    if getattr(engine, "name", None) == "hf":
        return DecoderModel(engine.model, engine.processor, engine.vocab)
    raise ValueError(f"decode='coordexp' with the {getattr(engine, 'name', '?')!r} engine needs decoder_model="
                     "DecoderModel(*load_model_and_processor(DIR)) (the HF model of the same weights)")


def evaluation_sampling(max_new_tokens: int):
    """How evaluation decodes: greedy, no penalty (rollouts decode the same way by default)."""
    from actors.engine import SamplingConfig

    return SamplingConfig(max_new_tokens=max_new_tokens)


def predict(engine, samples: list[Sample], prompt: str, *, batch_size: int = 8, max_new_tokens: int = 256,
            decode: str = "discrete", decoder_model: DecoderModel | None = None,
            score_mode: str = "prob") -> Iterator[dict]:
    """Greedy predictions for ``samples``: yields one prediction record per sample, in order.

    ``engine``: a RolloutEngine (``actors.engine``) with a ``.processor``. ``decode="coordexp"`` needs
    an HF model (``decoder_model``, or the HF engine's own model). Arguments are checked at the call,
    before any generation; the work happens batch by batch as the records are consumed.
    """
    from actors.engine import SamplingConfig

    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: choose one of {DECODES}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode={score_mode!r}: choose one of {SCORE_MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    decoder = (decoder_model or default_decoder(engine)) if decode == "coordexp" else None
    tokenizer = engine_tokenizer(engine, decoder_model)
    vocab = CoordVocab.from_tokenizer(tokenizer)
    sampling = evaluation_sampling(max_new_tokens)
    batches = (samples[i:i + batch_size] for i in range(0, len(samples), batch_size))
    return (rec for chunk in batches
            for rec in _predict_batch(engine, chunk, prompt, sampling, tokenizer, vocab, decoder, score_mode))


def _predict_batch(engine, chunk: list[Sample], prompt: str, sampling, tokenizer, vocab: CoordVocab,
                   decoder: DecoderModel | None, score_mode: str) -> list[dict]:
    from actors.engine import GenerationRequest

    images = [load_image(s) for s in chunk]
    requests = [GenerationRequest(im, prompt, s.sample_id) for im, s in zip(images, chunk)]
    results = engine.generate(requests, sampling)
    parsed = [parse_ids(r.generated_ids, tokenizer, vocab) for r in results]
    units = coordexp_unit_boxes(decoder, images, prompt, results, parsed) if decoder else [None] * len(chunk)
    return [prediction_record(s, r, p, vocab, unit_boxes=u, score_mode=score_mode)
            for s, r, p, u in zip(chunk, results, parsed, units)]


def write_predictions(records: Iterable[dict], path: str | Path, *, progress=None) -> Counter:
    """Append each record as one JSON line and flush it at once; returns counts per parse_status.

    ``progress``: an optional tqdm bar, advanced once per line.
    """
    counts: Counter = Counter()
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            counts[rec.get("parse_status", "?")] += 1
            if progress is not None:
                progress.update(1)
    return counts


def resume_done_ids(path: str | Path) -> set[str]:
    """``sample_id``s already written to ``path`` (empty when it does not exist).

    A crash can leave the last line cut short: the file is then rewritten without it. A broken line
    anywhere else is an error that names the line (the file is not ours to repair).
    """
    path = Path(path)
    if not path.exists():
        return set()
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done, kept = set(), []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            sample_id = rec["sample_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if n == len(lines):
                log.warning("%s line %d: incomplete last line (a crash?); rewriting the file without it", path, n)
                break
            raise ValueError(f"{path} line {n}: not a prediction line ({exc}); fix or delete the file") from exc
        done.add(str(sample_id))
        kept.append(line if line.endswith("\n") else line + "\n")
    if "".join(kept) != "".join(lines):
        path.write_text("".join(kept), encoding="utf-8")
    return done


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

# Settings that `--config FILE` supplies (the in-run evaluation's), else these built-in defaults; a flag
# given on the command line wins over both. flag dest -> (default without a config, value from a Config)
_SETTINGS = {
    "engine": ("vllm", lambda c: c.rollout.engine),
    "batch_size": (8, lambda c: c.rollout.batch_size),
    "max_new_tokens": (256, lambda c: c.rollout.max_new_tokens),
    "prompt": (None, lambda c: c.data.prompt),
    "skip_bbox_norm": (False, lambda c: c.data.skip_bbox_norm),
    "dtype": ("float32", lambda c: c.model.dtype),
    "device": ("cpu", lambda c: "cuda" if c.rollout.gpus_per_actor else "cpu"),
    "max_model_len": (2048, lambda c: c.rollout.max_model_len),
    "max_num_seqs": (None, lambda c: c.rollout.max_num_seqs),
    "gpu_memory_utilization": (0.5, lambda c: c.rollout.gpu_memory_utilization),
    "tensor_parallel_size": (1, lambda c: c.rollout.tensor_parallel_size),
    "max_pixels": (None, lambda c: c.data.max_pixels),
    "min_pixels": (None, lambda c: c.data.min_pixels),
    "image_root": (None, lambda c: (c.data.val_image_root or c.data.image_root or None)),
}


def engine_config(cfg, model_path):
    """The rollout engine a run's ``Config`` describes: the launcher's actors and `infer --config` use it."""
    from actors.engine import EngineConfig

    r = cfg.rollout
    return EngineConfig(model_path=str(model_path), kind=r.engine, dtype=cfg.model.dtype,
                        device="cuda" if r.gpus_per_actor else "cpu", seed=r.seed, max_model_len=r.max_model_len,
                        max_num_seqs=r.max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization,
                        tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                        max_pixels=cfg.data.max_pixels,
                        min_pixels=cfg.data.min_pixels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="Qwen3-VL folder with coord tokens")
    parser.add_argument("--data", required=True, type=Path, help="contract JSONL to predict on")
    parser.add_argument("--out", required=True, type=Path, help="predictions JSONL (appended; reruns resume)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a run's config.yaml: decoding settings as in that run's evaluation (rollout.engine, "
                             "batch_size, max_new_tokens, max_model_len, max_num_seqs, gpu_memory_utilization, "
                             "tensor_parallel_size, model.dtype, data.prompt/max_pixels/min_pixels/val_image_root); "
                             "flags given here override it")
    parser.add_argument("--engine", choices=("vllm", "hf"), help="generation engine (default vllm)")
    parser.add_argument("--decode", choices=DECODES, default="discrete",
                        help="discrete: bins k/1000; coordexp: expectation over the coord logits")
    parser.add_argument("--score", choices=SCORE_MODES, default="prob",
                        help="prob: mean token probability; constant: 1.0")
    parser.add_argument("--batch-size", type=int, help="requests per engine call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="generation length limit (default 256)")
    parser.add_argument("--prompt", help="the user instruction (default: the training default)")
    parser.add_argument("--image-root", type=Path, help="image folder (default: the data file's)")
    parser.add_argument("--skip-bbox-norm", action="store_const", const=True,
                        help="the data file holds '<|coord_k|>' coordinates (as in the training config)")
    parser.add_argument("--dtype", help="torch dtype name (default float32; bfloat16 on GPUs)")
    parser.add_argument("--device", help="HF engine / coordexp decoder device (default cpu)")
    parser.add_argument("--max-model-len", type=int, help="vLLM: prompt + generated tokens (default 2048)")
    parser.add_argument("--max-num-seqs", type=int, help="vLLM: sequences decoded together (default: --batch-size)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM on GPUs: share of device memory (0.5)")
    parser.add_argument("--tensor-parallel-size", type=int, help="vLLM tensor parallelism (default 1)")
    parser.add_argument("--max-pixels", type=int, help="image resize upper bound (default: the model folder's)")
    parser.add_argument("--min-pixels", type=int, help="image resize lower bound (default: the model folder's)")


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset flag from ``--config`` (if given), else from the built-in default; in place."""
    from coordexp_rl.config import DEFAULT_PROMPT, load_config

    cfg = load_config(args.config) if args.config is not None else None
    for name, (default, from_cfg) in _SETTINGS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, from_cfg(cfg) if cfg is not None else default)
    args.prompt = args.prompt or DEFAULT_PROMPT
    args.max_num_seqs = args.max_num_seqs or args.batch_size
    args.image_root = Path(args.image_root) if args.image_root else None
    return args


def run(args: argparse.Namespace) -> int:
    from coordexp_rl.data.loader import DataError, load_samples

    try:
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
    from coordexp_rl.modeling.load import load_processor

    from coordexp_rl.data.loader import DataError

    processor = load_processor(args.model, args.max_pixels, args.min_pixels)
    try:
        check_prompt_budget(samples, processor, args.prompt, args.max_new_tokens, args.max_model_len, args.data)
    except DataError as exc:
        raise DataError(f"{exc} (here: --max-new-tokens, --max-model-len, --max-pixels, or the --config's)") from None


def _predict_to_file(args: argparse.Namespace, todo: list[Sample]) -> Counter:
    from tqdm import tqdm

    from actors.engine import EngineConfig, make_engine

    engine = make_engine(EngineConfig(str(args.model), kind=args.engine, dtype=args.dtype, device=args.device,
                                      max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                      gpu_memory_utilization=args.gpu_memory_utilization,
                                      tensor_parallel_size=args.tensor_parallel_size, max_pixels=args.max_pixels,
                                      min_pixels=args.min_pixels))
    try:
        decoder = None
        if args.decode == "coordexp" and args.engine != "hf":
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
