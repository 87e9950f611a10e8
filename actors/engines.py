"""Building the rollout engine a config names (``make_engine``) and the weight-payload check both engines use.

The interface the engines implement (request / result / sampling types, the ``RolloutEngine`` Protocol)
lives in ``coordexp_rl.rollout.engine``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from coordexp_rl.rollout.engine import EngineConfig, RolloutEngine


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


def make_engine(config: EngineConfig) -> RolloutEngine:
    """The engine that ``config.kind`` names (imports only that engine's stack)."""
    if config.kind == "vllm":
        from actors.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.kind == "hf":
        from actors.hf_engine import HFEngine

        return HFEngine(config)
    raise ValueError(f"engine kind {config.kind!r}: choose 'vllm' or 'hf'")
