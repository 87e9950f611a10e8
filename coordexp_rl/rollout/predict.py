"""Inference (METHOD 9), the library behind `coordexp-rl infer` (``coordexp_rl.tools.infer``) and evaluation.

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

Engines come in through the interface in ``coordexp_rl.rollout.engine``; this module never imports ``actors/``
(the engines) or Ray.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from coordexp_rl.data.loader import Sample, load_image
from coordexp_rl.method.coords import CoordVocab, bins_to_pixels
from coordexp_rl.method.protocol import ParsedObject, ParseResult, parse_ids
from coordexp_rl.rollout.engine import DecoderModel, GenerationRequest, RolloutEngine, evaluation_sampling

log = logging.getLogger(__name__)

DECODES = ("discrete", "coordexp")
SCORE_MODES = ("prob", "constant")


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

    >>> round(joint_prob([math.log(0.5), 0.0, math.log(0.25)], [0, 2]), 6)
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

    from coordexp_rl.method.coordexp import coordexp
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

def predict(engine: RolloutEngine, samples: list[Sample], prompt: str, *, batch_size: int, max_new_tokens: int,
            decode: str = "discrete", decoder_model: DecoderModel | None = None,
            score_mode: str = "prob") -> Iterator[dict]:
    """Greedy predictions for ``samples``: yields one prediction record per sample, in order.

    ``engine``: a ``coordexp_rl.rollout.engine.RolloutEngine``. ``decode="coordexp"`` needs an HF model
    (``decoder_model``, or the engine's ``own_decoder()``). Arguments are checked at the call, before any
    generation; the work happens batch by batch as the records are consumed.
    """
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: choose one of {DECODES}")
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode={score_mode!r}: choose one of {SCORE_MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    decoder = (decoder_model or engine.own_decoder()) if decode == "coordexp" else None
    if decode == "coordexp" and decoder is None:
        raise ValueError(f"decode='coordexp' with the {engine.name!r} engine needs decoder_model="
                         "DecoderModel(*load_model_and_processor(DIR)) (the HF model of the same weights)")
    tokenizer = (decoder_model or engine).processor.tokenizer
    vocab = CoordVocab.from_tokenizer(tokenizer)
    sampling = evaluation_sampling(max_new_tokens)
    batches = (samples[i:i + batch_size] for i in range(0, len(samples), batch_size))
    return (rec for chunk in batches
            for rec in _predict_batch(engine, chunk, prompt, sampling, tokenizer, vocab, decoder, score_mode))


def _predict_batch(engine, chunk: list[Sample], prompt: str, sampling, tokenizer, vocab: CoordVocab,
                   decoder: DecoderModel | None, score_mode: str) -> list[dict]:
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

    A crash can leave the last line cut short (not JSON, no newline): the file is then rewritten without
    it. Any other line that is not a prediction (broken anywhere else, or JSON without a ``sample_id``,
    e.g. an annotation file given as --out) is an error that names the line: the file is not ours.
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
            if n == len(lines) and isinstance(exc, json.JSONDecodeError) and not line.endswith("\n"):
                log.warning("%s line %d: incomplete last line (a crash?); rewriting the file without it", path, n)
                break
            raise ValueError(f"{path} line {n}: not a prediction line ({exc}); fix or delete the file") from exc
        done.add(str(sample_id))
        kept.append(line if line.endswith("\n") else line + "\n")
    if "".join(kept) != "".join(lines):
        path.write_text("".join(kept), encoding="utf-8")
    return done
