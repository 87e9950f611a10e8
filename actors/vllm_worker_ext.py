"""vLLM worker extension: in-place weight reload, one control call per sync.

Named by string in ``LLM(worker_extension_cls="actors.vllm_worker_ext.WeightLoaderExtension")``; vLLM
mixes the class into its worker, so ``self`` is the worker (``self.model_runner``, ``self.reload_weights``).
Called as ``llm.collective_rpc("reload_weights_from", args=(named_tensors, omitted_names))``.

Why ``reload_weights`` and not ``model.load_weights``: the CPU backend repacks linear weights after the
first load, so a second ``load_weights`` fails (docs/PLATFORM.md). ``reload_weights`` restores the
checkpoint layout layer by layer, loads, and re-runs the post-load processing.

Why we validate first: ``reload_weights`` moves each layer to the meta device and materialises it only
once all of the layer's weights have arrived, so a payload with a missing tensor, an unknown name or a
wrong shape would leave the model half loaded. Checking names and shapes against the checkpoint's own
safetensors headers before touching the model makes a bad payload a clean rejection.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from actors.engines import validate_payload

log = logging.getLogger(__name__)


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every tensor in a safetensors checkpoint folder (headers only)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files; weight validation needs the checkpoint")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


class _DropLayerWithoutWeightsWarnings(logging.Filter):
    """vLLM warns at every reload, once per layer that received no tensors. The payload was checked
    complete against the checkpoint first, so such a layer holds none of the checkpoint's tensors (rotary
    tables, the image-normalising constants, a tied lm_head) or only declared omissions (frozen): the
    reload puts its tensors back, as intended, and a warning per sync would bury the useful lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Failed to load weights" not in msg and "were not loaded from checkpoint" not in msg


@contextmanager
def _quiet_layers_without_weights():
    loggers = [logging.getLogger("vllm.model_executor.model_loader.reload.layerwise"),
               logging.getLogger("vllm.model_executor.model_loader.reload.inplace")]
    filt = _DropLayerWithoutWeightsWarnings()
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(filt)


class WeightLoaderExtension:
    """Mixed into vLLM's worker; methods run on every worker via ``collective_rpc``."""

    def _checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        # A mixin: vLLM constructs the worker (no __init__ of ours runs), so the cache is made on first use.
        cached = getattr(self, "_coordexp_shapes", None)
        if cached is None:
            cached = checkpoint_shapes(self.model_runner.model_config.model)
            self._coordexp_shapes = cached
        return cached

    def _tied_optional(self) -> frozenset[str]:
        hf_config = self.model_runner.model_config.hf_config
        text = getattr(hf_config, "text_config", hf_config)
        tied = getattr(hf_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        return frozenset({"lm_head.weight"}) if tied else frozenset()

    def reload_weights_from(self, named_tensors: Sequence[tuple[str, torch.Tensor]],
                            omitted: Sequence[str] = ()) -> int:
        """Validate then load HF-checkpoint-named tensors in place; returns the number loaded.

        ``omitted``: names left out on purpose (frozen); their layers keep their current kernel tensors
        (vLLM's reload puts back the tensors of a layer that received nothing). Raises ValueError (model
        untouched) on a payload that does not match the checkpoint.
        """
        optional = self._tied_optional()
        pairs = [(n, t if isinstance(t, torch.Tensor) else torch.as_tensor(t)) for n, t in named_tensors]
        validate_payload([(n, tuple(t.shape)) for n, t in pairs], self._checkpoint_shapes(), optional, omitted)
        expected = self._checkpoint_shapes()
        pairs = [(n, t) for n, t in pairs if n in expected]  # drop a tied lm_head the checkpoint lacks
        with _quiet_layers_without_weights():  # validated above
            self.reload_weights(weights_iterator=iter(pairs), is_checkpoint_format=True)
        if optional:
            self._refresh_tied_lm_head()
        log.info("reloaded %d tensors in place (%d omitted)", len(pairs), len(omitted))
        return len(pairs)

    def _refresh_tied_lm_head(self) -> None:
        """Rebuild the tied lm_head's kernel state from the freshly loaded embedding.

        A tied lm_head shares its weight with embed_tokens, so the reload never loads it and never re-runs
        its post-load processing; on CPU that processing packs a private copy of the weight for the GEMM
        (``cpu_linear``), which would keep computing logits with the OLD embedding (measured: near-uniform
        log-probs after pushing a changed embedding). Re-running it repacks from the shared weight; on GPUs
        the unquantized method does nothing.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        for name, module in self.model_runner.get_model().named_modules():
            method = getattr(module, "quant_method", None)
            if name.endswith("lm_head") and isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
