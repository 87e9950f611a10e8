"""The rollout engine interface: request, result and sampling types and the ``RolloutEngine`` Protocol.

Two implementations live in ``actors/`` (``vllm_engine``, ``hf_engine``; ``actors.engines.make_engine``
builds one); the core (``coordexp_rl.rollout.predict``) and the actors both import this module, so the core
never imports ``actors/``. An engine turns a batch of (image, prompt) requests into token ids plus the
log-prob of every sampled token, and takes new weights from the learner.

Log-prob semantics (both engines): ``logprobs[t]`` is ``log_softmax(raw_logits_t)[generated_ids[t]]``,
the log-prob under the model's own distribution BEFORE temperature, top-k/top-p and repetition penalty
(vLLM's default ``logprobs_mode="raw_logprobs"``). That is what a plain learner-side forward gives, so
the learner can compare its own log-probs with the rollout's without replaying the sampler.

The numbers a run tunes (token budget, memory share, lengths) have their defaults in one place,
``coordexp_rl.config``; ``SamplingConfig.from_config`` / ``EngineConfig.from_config`` carry a run's over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from coordexp_rl.config import ModelConfig, RolloutConfig
from coordexp_rl.method.coords import CoordVocab

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings shared by both engines. The optional fields default to "off" (greedy, no
    nucleus, no top-k, no penalty); ``max_new_tokens`` has no default here (config ``rollout``)."""

    max_new_tokens: int  # generation stops here with finish_reason "length"
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens; 0 = off (vLLM's -1)
    repetition_penalty: float = 1.0  # CTRL-style: > 1 discourages tokens already in prompt + output
    seed: int | None = None  # per-batch base seed; request i uses seed + i (reproducible sampling)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1.0 = off)")

    @classmethod
    def from_config(cls, rollout) -> "SamplingConfig":
        """The rollout actors' decoding, from the config's ``rollout`` section (a RolloutConfig)."""
        r = rollout
        return cls(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                   repetition_penalty=r.repetition_penalty, seed=r.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def evaluation_sampling(max_new_tokens: int) -> SamplingConfig:
    """How evaluation decodes: greedy, no penalty (rollouts decode the same way by default)."""
    return SamplingConfig(max_new_tokens=max_new_tokens)


_ROLLOUT, _MODEL = RolloutConfig(), ModelConfig()  # the defaults' one home (config ``rollout`` / ``model``)


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine (both kinds read the same fields; vLLM-only ones say so). A run builds it
    with ``from_config``; the defaults here are the config's own (``RolloutConfig``, ``ModelConfig``)."""

    model_path: str  # a Qwen3-VL folder with the coord vocabulary (e.g. make_tiny_model's output)
    kind: Literal["vllm", "hf"] = _ROLLOUT.engine
    dtype: str = _MODEL.dtype  # torch dtype name; "bfloat16" on GPUs
    device: str = "cpu"  # hf only; vLLM picks its platform itself
    seed: int = _ROLLOUT.seed  # engine-level seed (vLLM's global seed)
    max_model_len: int = _ROLLOUT.max_model_len  # vLLM: prompt + generated tokens per sequence
    max_num_seqs: int = _ROLLOUT.max_num_seqs  # vLLM: sequences decoded together
    enforce_eager: bool = _ROLLOUT.enforce_eager  # vLLM: no CUDA graphs / compile (CPU: avoids a 10-15 s cold compile)
    gpu_memory_utilization: float = _ROLLOUT.gpu_memory_utilization  # vLLM on GPUs: share of device memory
    tensor_parallel_size: int = _ROLLOUT.tensor_parallel_size  # vLLM
    max_pixels: int | None = None  # image resize bounds (data.max_pixels / min_pixels); None = the folder's
    min_pixels: int | None = None
    attn_implementation: str = _MODEL.attn_implementation  # hf only (model.attn_implementation); vLLM picks its own

    @classmethod
    def from_config(cls, cfg, model_path, **changes) -> "EngineConfig":
        """The engine a run's ``Config`` describes (the launcher's actors, `infer --config`, benches, tests);
        ``changes`` replace fields, e.g. ``kind="hf"``."""
        r = cfg.rollout
        fields = dict(model_path=str(model_path), kind=r.engine, dtype=cfg.model.dtype,
                      device="cuda" if r.gpus_per_actor else "cpu", seed=r.seed, max_model_len=r.max_model_len,
                      max_num_seqs=r.max_num_seqs, gpu_memory_utilization=r.gpu_memory_utilization,
                      tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                      max_pixels=cfg.data.max_pixels,
                      min_pixels=cfg.data.min_pixels, attn_implementation=cfg.model.attn_implementation)
        return cls(**{**fields, **changes})


@dataclass
class GenerationRequest:
    """One image plus the user prompt text (unexpanded; the engine inserts the image placeholders)."""

    image: Image.Image
    prompt_text: str
    sample_id: str = ""


@dataclass
class GenerationResult:
    """What an engine produced for one request.

    ``prompt_ids``: the prompt with image placeholders expanded (equal to ``encode_prompt``'s input_ids).
    ``generated_ids``: sampled tokens, up to and including EOS when it was produced.
    ``logprobs``: one float per generated id (raw log-probs, see the module docstring).
    """

    sample_id: str
    prompt_ids: list[int]
    generated_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int = 0

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.generated_ids):
            raise ValueError(f"sample {self.sample_id!r}: {len(self.logprobs)} log-probs for "
                             f"{len(self.generated_ids)} generated ids")


class DecoderModel(NamedTuple):
    """The HF model used by ``decode="coordexp"``: ``DecoderModel(*load_model_and_processor(DIR))``."""

    model: object  # Qwen3VLForConditionalGeneration
    processor: object
    vocab: CoordVocab


class WeightLoadError(RuntimeError):
    """A weight update was rejected before touching the model; the engine keeps its old version."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the rollout actor and ``coordexp_rl.rollout.predict`` need from an engine."""

    name: str  # "vllm" | "hf": goes into every rollout row
    processor: object  # the project's processor (coordexp_rl.modeling.load): its tokenizer parses the output

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[GenerationResult]:
        """Results in request order."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                     omitted: Sequence[str] = ()) -> None:
        """Replace weights (checkpoint names, HF layout) and set ``weight_version``; raise on failure.
        ``omitted``: names left out on purpose (frozen: the engine keeps its own)."""
        ...

    @property
    def weight_version(self) -> int: ...

    def reset_caches(self) -> None:
        """Forget everything computed for earlier requests (prefixes, image encodings): after a weight load,
        and before a timed batch that must not reuse an earlier one's work (``bench rollout``)."""
        ...

    def own_decoder(self) -> DecoderModel | None:
        """The HF model this engine generates with, when it holds one in this process (the HF engine), so
        ``decode="coordexp"`` needs no second copy; None when it does not (vLLM)."""
        ...

    def close(self) -> None: ...
