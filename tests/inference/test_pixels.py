"""data.max_pixels / min_pixels reach every reader: at a non-default setting, both engines' prompt ids
equal the learner's (the processor that `load_model_and_processor` returns) for images of several sizes
and aspect ratios, and the setting really changes the image-token count (so equality is not trivial)."""

from __future__ import annotations

import pytest
from PIL import Image

from actors.engines import make_engine
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.modeling.load import load_model_and_processor, load_processor
from coordexp_rl.rollout.engine import EngineConfig, GenerationRequest, SamplingConfig

PROMPT = "Detect all objects."
MAX_PIXELS, MIN_PIXELS = 128 * 128, 32 * 32 * 3  # folder's: 256 * 256 and 32 * 32 * 4
SIZES = [(640, 480), (480, 640), (1000, 200), (96, 128), (1920, 1080), (33, 33), (200, 1000)]  # (w, h)


def images():
    return [Image.new("RGB", size, (i * 30, 90, 200 - i * 20)) for i, size in enumerate(SIZES)]


def learner_prompt_ids(model_dir) -> list[list[int]]:
    """The learner's processor: the one `Learner` builds with cfg.data.max_pixels / min_pixels."""
    _, processor, _ = load_model_and_processor(model_dir, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    return [encode_prompt(processor, im, PROMPT)["input_ids"].tolist() for im in images()]


def engine_prompt_ids(model_dir, kind: str, **extra) -> list[list[int]]:
    engine = make_engine(EngineConfig(str(model_dir), kind=kind, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS,
                                      **extra))
    try:
        results = engine.generate([GenerationRequest(im, PROMPT, str(i)) for i, im in enumerate(images())],
                                  SamplingConfig(max_new_tokens=1))
        return [r.prompt_ids for r in results]
    finally:
        engine.close()


def test_setting_changes_the_image_tokens(tiny_model_dir):
    folder = load_processor(tiny_model_dir)
    ours = load_processor(tiny_model_dir, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    grids = [(encode_prompt(folder, im, PROMPT)["image_grid_thw"].prod().item(),
              encode_prompt(ours, im, PROMPT)["image_grid_thw"].prod().item()) for im in images()]
    assert all(o <= MAX_PIXELS // 256 for _, o in grids)  # patches of 16 x 16 px
    assert sum(f != o for f, o in grids) >= 5  # large images shrink, the 33x33 one grows less


def test_hf_engine_prompt_ids_equal_learner(tiny_model_dir):
    assert engine_prompt_ids(tiny_model_dir, "hf") == learner_prompt_ids(tiny_model_dir)


@pytest.mark.integration
def test_vllm_engine_prompt_ids_equal_learner(tiny_model_dir):
    vllm_ids = engine_prompt_ids(tiny_model_dir, "vllm", max_model_len=256, max_num_seqs=8)
    learner_ids = learner_prompt_ids(tiny_model_dir)
    assert [len(v) for v in vllm_ids] == [len(x) for x in learner_ids]
    assert vllm_ids == learner_ids
