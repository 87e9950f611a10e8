"""The rollout engine interface: one Protocol, two implementations (``vllm_engine``, ``hf_engine``).

An engine turns a batch of (image, prompt) requests into token ids plus the log-prob of every sampled
token, and takes new weights from the learner. Everything engine-specific stays behind this door.

Log-prob semantics (both engines): ``logprobs[t]`` is ``log_softmax(raw_logits_t)[generated_ids[t]]``,
the log-prob under the model's own distribution BEFORE temperature, top-k/top-p and repetition penalty
(vLLM's default ``logprobs_mode="raw_logprobs"``). That is what a plain learner-side forward gives, so
the learner can compare its own log-probs with the rollout's without replaying the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings shared by both engines. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256  # generation stops here with finish_reason "length"
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class EngineConfig:
    """How to build an engine (both kinds read the same fields; vLLM-only ones say so)."""

    model_path: str  # a Qwen3-VL folder with the coord vocabulary (e.g. make_tiny_model's output)
    kind: Literal["vllm", "hf"] = "vllm"
    dtype: str = "float32"  # torch dtype name; "bfloat16" on GPUs
    device: str = "cpu"  # hf only; vLLM picks its platform itself
    seed: int = 0  # engine-level seed (vLLM's global seed)
    max_model_len: int = 1024  # vLLM: prompt + generated tokens per sequence
    max_num_seqs: int = 8  # vLLM: sequences decoded together
    enforce_eager: bool = True  # vLLM: no graph capture / compile (avoids 10-15 s cold compile on CPU)
    gpu_memory_utilization: float = 0.5  # vLLM on GPUs: fraction of device memory it may take
    tensor_parallel_size: int = 1  # vLLM
    max_pixels: int | None = None  # image resize bounds (data.max_pixels / min_pixels); None = the folder's
    min_pixels: int | None = None


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
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.generated_ids):
            raise ValueError(f"sample {self.sample_id!r}: {len(self.logprobs)} log-probs for "
                             f"{len(self.generated_ids)} generated ids")


class WeightLoadError(RuntimeError):
    """A weight update was rejected before touching the model; the engine keeps its old version."""


def validate_payload(names_shapes: Sequence[tuple[str, tuple[int, ...]]], expected: dict[str, tuple[int, ...]],
                     optional: frozenset[str] = frozenset(), omitted: Iterable[str] = ()) -> None:
    """Raise ValueError, naming the offending tensors, unless the payload names exactly the checkpoint's
    tensors with its shapes.

    ``optional`` names may be present or absent (e.g. a tied ``lm_head.weight``: the learner's
    state_dict carries it, the checkpoint does not). ``omitted``: names the sender left out on purpose
    (frozen tensors the engine already holds); they must be checkpoint names and must not be sent.
    """
    seen: dict[str, tuple[int, ...]] = {}
    for name, shape in names_shapes:
        if name in seen:
            raise ValueError(f"weight payload names {name!r} twice")
        seen[name] = tuple(shape)
    omitted = set(omitted)
    unknown = sorted(n for n in seen.keys() | omitted if n not in expected and n not in optional)
    missing = sorted(n for n in expected if n not in seen and n not in optional and n not in omitted)
    both = sorted(n for n in omitted if n in seen)
    wrong = sorted(f"{n}: got {seen[n]}, checkpoint has {expected[n]}"
                   for n in seen if n in expected and seen[n] != expected[n])
    problems = [f"{len(names)} {what}: {_listed(names)}" for what, names in (
        ("unknown names", unknown), ("missing names", missing), ("names both sent and omitted", both),
        ("wrong shapes", wrong)) if names]
    if problems:
        raise ValueError("weight payload rejected, model unchanged: " + "; ".join(problems)
                         + ". Send the full HF-layout state_dict of the same architecture.")


def _listed(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the rollout actor needs from an engine."""

    name: str

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

    def close(self) -> None: ...


def make_engine(config: EngineConfig) -> RolloutEngine:
    """The engine that ``config.kind`` names (imports only that engine's stack)."""
    if config.kind == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.kind == "hf":
        from actors.hf_engine import HFEngine

        return HFEngine(config)
    raise ValueError(f"engine kind {config.kind!r}: choose 'vllm' or 'hf'")
