"""The transformers ``generate`` engine: the fallback where vLLM is missing, and the reference for it.

Inputs come from ``coordexp_rl.modeling.inputs.encode_prompt`` (the learner's own function), one request
at a time, then left-padded into a batch, so ``prompt_ids`` equal ``encode_prompt``'s input_ids.

Log-probs are ``log_softmax`` of the RAW logits (``output_logits=True``: before temperature, top-k/top-p
and repetition penalty), the same semantics as vLLM's ``logprobs_mode="raw_logprobs"``.

Known differences from vLLM (same distribution, different draws):
- sampling uses torch's global generator (forked and seeded with ``SamplingConfig.seed`` per batch), not
  vLLM's per-request generators, so sampled tokens differ between engines even with equal seeds;
- in a padded batch the repetition penalty also sees the left-pad tokens of shorter prompts.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch

from actors.engines import validate_payload
from coordexp_rl.rollout.engine import (
    DecoderModel,
    EngineConfig,
    GenerationRequest,
    GenerationResult,
    SamplingConfig,
    WeightLoadError,
)
from coordexp_rl.runtime import prepare_runtime

log = logging.getLogger(__name__)


class HFEngine:
    """``Qwen3VLForConditionalGeneration.generate`` behind the ``RolloutEngine`` interface."""

    name = "hf"

    def __init__(self, config: EngineConfig) -> None:
        prepare_runtime()
        from coordexp_rl.modeling.load import load_model_and_processor

        self.config = config
        self.model, self.processor, self.vocab = load_model_and_processor(
            config.model_path, config.dtype, config.device, max_pixels=config.max_pixels, min_pixels=config.min_pixels,
            attn_implementation=config.attn_implementation)
        self.model.eval()
        tok = self.processor.tokenizer
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        # Stop ids as vLLM collects them: the tokenizer's EOS plus generation_config's.
        self.eos_ids = sorted({int(tok.eos_token_id), self.vocab.eos_id, *map(int, gen_eos)})
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_ids[0])
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    def own_decoder(self) -> DecoderModel:
        """The model it generates with: ``decode="coordexp"`` reuses it (no second copy)."""
        return DecoderModel(self.model, self.processor, self.vocab)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[GenerationResult]:
        from coordexp_rl.modeling.inputs import encode_prompt

        if not requests:
            return []
        encs = [encode_prompt(self.processor, r.image, r.prompt_text) for r in requests]
        batch = self._left_pad(encs)
        prompt_len = batch["input_ids"].shape[1]
        with torch.random.fork_rng(devices=self._rng_devices()):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(**batch, generation_config=self._generation_config(sampling))
        new = out.sequences[:, prompt_len:]  # (B, T) with pad after a row's EOS
        logits = torch.stack(out.logits, dim=1).float()  # (B, T, V) raw, before processors
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return [self._result(req, enc, new[i], logprobs[i]) for i, (req, enc) in enumerate(zip(requests, encs))]

    def _left_pad(self, encs: list[dict]) -> dict[str, torch.Tensor]:
        """Left-pad input_ids / mm_token_type_ids into (B, L); images concatenated in request order."""
        length = max(int(e["input_ids"].shape[0]) for e in encs)
        ids = torch.full((len(encs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), length), dtype=torch.long)
        mm_types = torch.zeros((len(encs), length), dtype=torch.long)
        for i, e in enumerate(encs):
            n = int(e["input_ids"].shape[0])
            ids[i, length - n:] = e["input_ids"]
            mask[i, length - n:] = 1
            mm_types[i, length - n:] = e["mm_token_type_ids"]
        device = self.model.device
        return {
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "mm_token_type_ids": mm_types.to(device),
            "pixel_values": torch.cat([e["pixel_values"] for e in encs]).to(device, self.model.dtype),
            "image_grid_thw": torch.cat([e["image_grid_thw"] for e in encs]).to(device),
        }

    def _generation_config(self, s: SamplingConfig):
        from transformers import GenerationConfig

        sample = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k) if not s.greedy \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return GenerationConfig(
            max_new_tokens=s.max_new_tokens, repetition_penalty=s.repetition_penalty,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, bos_token_id=None,
            output_logits=True, return_dict_in_generate=True, use_cache=True, **sample,
        )

    def _result(self, req: GenerationRequest, enc: dict, new: torch.Tensor, logprobs: torch.Tensor
                ) -> GenerationResult:
        ids = new.tolist()
        stop = next((t for t, tok in enumerate(ids) if tok in self.eos_ids), None)
        end = len(ids) if stop is None else stop + 1  # keep the EOS, drop the padding after it
        return GenerationResult(
            sample_id=req.sample_id, prompt_ids=enc["input_ids"].tolist(), generated_ids=ids[:end],
            logprobs=logprobs[:end].tolist(), finish_reason="length" if stop is None else "stop",
            weight_version=self._version,
        )

    def reset_caches(self) -> None:
        """Nothing to forget: ``generate`` keeps no state between calls."""

    def _rng_devices(self) -> list:
        return [self.model.device] if self.model.device.type == "cuda" else []

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                     omitted: Sequence[str] = ()) -> None:
        """Copy HF-named tensors into the model after checking names and shapes (WeightLoadError if not)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        payload = list(named_tensors)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        try:
            validate_payload([(n, tuple(t.shape)) for n, t in payload],
                             {n: tuple(p.shape) for n, p in params.items()}, frozenset(tied), omitted)
        except ValueError as exc:
            raise WeightLoadError(f"weight version {version} rejected: {exc}") from exc
        t0 = time.perf_counter()
        for name, tensor in payload:
            params[name].copy_(tensor)
        self._version = int(version)
        log.info("HF engine: weight version %d (%d tensors) in %.3f s", version, len(payload),
                 time.perf_counter() - t0)

    def close(self) -> None:
        self.model = None
