"""Up-front length checks, before any work: prompts that fit the engine, targets that fit the learner.

Two limits, each checked per sample with an error that names the file, line, sample and the setting:

- prompt: ``image tokens (at data.max_pixels) + text tokens + rollout.max_new_tokens <= rollout.max_model_len``
  (a longer sequence is cut or refused by vLLM mid-run; counted here from the record's width / height,
  without opening the image);
- target: the GT assistant sequence must fit ``data.max_target_tokens`` (0 = ``rollout.max_new_tokens``).
  ``data.too_many_objects: truncate`` keeps the longest prefix of whole objects in the written (canonical)
  order instead, never a part of an object, and counts what it cut.

Token arithmetic of the protocol (``coordexp_rl.method.protocol.build_assistant_ids``): one object is
``<obj> <desc> d.. </desc> <box> c1 c2 c3 c4 </box> </obj>`` = 10 + (description tokens); the turn ends
with one ``<|im_end|>``. So N objects of d-token names take N (10 + d) + 1 tokens (COCO names: d = 1.75 on
average with the Qwen tokenizer, 60 objects ~ 706).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from coordexp_rl.data.loader import DataError, Sample, load_samples
from coordexp_rl.method.protocol import canonical_order

OBJECT_OVERHEAD_TOKENS = 10  # <obj> <desc> </desc> <box> 4 coords </box> </obj>
END_TOKENS = 1  # <|im_end|>


def image_token_count(processor, width: int, height: int) -> int:
    """Image tokens the processor makes of a ``width`` x ``height`` image (its resize, no pixels read)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    factor = int(ip.patch_size) * int(ip.merge_size)
    h, w = smart_resize(height, width, factor=factor, min_pixels=_size(ip, "shortest_edge"),
                        max_pixels=_size(ip, "longest_edge"))
    return (h // factor) * (w // factor)


def _size(ip, key: str) -> int:
    size = ip.size
    return int(size[key] if isinstance(size, dict) else getattr(size, key))


def prompt_token_counter(processor, prompt: str) -> Callable[[int, int], int]:
    """``f(width, height)`` -> prompt tokens incl. image tokens (equals ``encode_prompt``'s length)."""
    from coordexp_rl.modeling.inputs import render_prompt

    text_ids = processor.tokenizer(render_prompt(processor, prompt), add_special_tokens=False)["input_ids"]
    text = len(text_ids) - 1  # the one unexpanded image placeholder becomes the image tokens
    cache: dict[tuple[int, int], int] = {}

    def count(width: int, height: int) -> int:
        if (width, height) not in cache:
            cache[(width, height)] = text + image_token_count(processor, width, height)
        return cache[(width, height)]

    return count


def where(sample: Sample, source: str | Path) -> str:
    line = f":{sample.line}" if sample.line else ""
    return f"{source}{line}: sample {sample.sample_id!r} ({sample.image_rel}, {sample.width}x{sample.height})"


def check_prompt_budget(samples: list[Sample], processor, prompt: str, max_new_tokens: int, max_model_len: int,
                        source: str | Path) -> int:
    """Raise DataError for the first sample whose prompt + max_new_tokens exceeds max_model_len; else the
    longest prompt (tokens)."""
    count = prompt_token_counter(processor, prompt)
    longest = 0
    for s in samples:
        n = count(s.width, s.height)
        longest = max(longest, n)
        if n + max_new_tokens > max_model_len:
            image = image_token_count(processor, s.width, s.height)
            raise DataError(
                f"{where(s, source)}: prompt {n} tokens ({image} image tokens at data.max_pixels="
                f"{_size(processor.image_processor, 'longest_edge')}) + rollout.max_new_tokens={max_new_tokens} = "
                f"{n + max_new_tokens} > rollout.max_model_len={max_model_len}; raise rollout.max_model_len to "
                f">= {n + max_new_tokens} or lower data.max_pixels / rollout.max_new_tokens")
    return longest


def target_tokens(objects, desc_tokens: Callable[[str], int]) -> int:
    """Length of the GT assistant sequence of ``objects`` (see the module docstring)."""
    return sum(OBJECT_OVERHEAD_TOKENS + desc_tokens(o.desc) for o in objects) + END_TOKENS


def fit_targets(samples: list[Sample], tokenizer, max_tokens: int, policy: str,
                source: str | Path) -> tuple[list[Sample], dict[str, int]]:
    """Samples whose GT fits ``max_tokens``; ``policy`` "error" raises DataError naming the first sample
    over it, "truncate" cuts it at an object boundary. Returns (samples, counts for the metrics)."""
    if policy not in ("error", "truncate"):
        raise ValueError(f"data.too_many_objects={policy!r}: choose 'error' or 'truncate'")
    lengths: dict[str, int] = {}

    def desc_tokens(desc: str) -> int:
        if desc not in lengths:
            lengths[desc] = len(tokenizer.encode(desc, add_special_tokens=False))
        return lengths[desc]

    out, truncated, dropped, longest = [], 0, 0, 0
    for s in samples:
        n = target_tokens(s.objects, desc_tokens)
        if n <= max_tokens:
            out.append(s)
            longest = max(longest, n)
            continue
        if policy == "error":
            raise DataError(
                f"{where(s, source)}: its {len(s.objects)} objects take {n} target tokens > data.max_target_tokens="
                f"{max_tokens} (0 = rollout.max_new_tokens); raise data.max_target_tokens (and "
                "rollout.max_new_tokens), or set data.too_many_objects=truncate to keep the first whole objects")
        kept = _truncate(s, max_tokens, desc_tokens)
        truncated, dropped = truncated + 1, dropped + len(s.objects) - len(kept.objects)
        longest = max(longest, target_tokens(kept.objects, desc_tokens))
        out.append(kept)
    return out, {"data/truncated_samples": truncated, "data/dropped_objects": dropped,
                 "data/max_target_tokens": longest}


def _truncate(sample: Sample, max_tokens: int, desc_tokens: Callable[[str], int]) -> Sample:
    """Keep the longest prefix of whole objects, in the canonical (written) order, that fits."""
    pairs = dict(zip((id(o) for o in sample.objects), sample.boxes_px))
    budget, kept = max_tokens - END_TOKENS, []
    for obj in canonical_order(sample.objects):
        cost = OBJECT_OVERHEAD_TOKENS + desc_tokens(obj.desc)
        if cost > budget:
            break
        budget -= cost
        kept.append(obj)
    return dataclasses.replace(sample, objects=kept, boxes_px=[pairs[id(o)] for o in kept])


def check_one_record_per_image(samples: list[Sample], path: str | Path) -> None:
    """Evaluation pairs predictions with the GT by image: a validation file with two records of one image
    (e.g. one per referring expression) is refused now, not by the first evaluation after the work."""
    first: dict[str, int] = {}
    for s in samples:
        if s.image_rel in first:
            raise DataError(f"{path}:{s.line}: images[0]: {s.image_rel!r} has a record already (line "
                            f"{first[s.image_rel]}); evaluation pairs predictions with the GT by image: merge "
                            "them into one record (`coordexp-rl convert refcoco` writes one per image)")
        first[s.image_rel] = s.line


def load_checked_samples(cfg, path: str | Path, image_root: str | Path | None, processor, *,
                         check_images: bool, train: bool) -> tuple[list[Sample], dict[str, int]]:
    """``load_samples`` plus both length checks of ``cfg`` (a ``Config``); train=True also fits the targets.

    The one loader of the driver and the learner ranks: the driver opens the images (``check_images``
    = data.check_images), the learner ranks never do (the driver already did, or `validate` did).
    """
    samples = load_samples(path, image_root, skip_bbox_norm=cfg.data.skip_bbox_norm, check_images=check_images)
    r = cfg.rollout
    longest = check_prompt_budget(samples, processor, cfg.data.prompt, r.max_new_tokens, r.max_model_len, path)
    counts = {"data/max_prompt_tokens": longest}
    if not train:
        check_one_record_per_image(samples, path)
    if train:
        limit = cfg.data.max_target_tokens or r.max_new_tokens
        samples, fitted = fit_targets(samples, processor.tokenizer, limit, cfg.data.too_many_objects, path)
        counts.update(fitted)
    return samples, counts
