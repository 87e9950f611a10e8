"""Shared fixtures. prepare_runtime() runs before any test module imports transformers or vLLM."""

from coordexp_rl.runtime import prepare_runtime

prepare_runtime()
