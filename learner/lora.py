"""LoRA on the learner (model.lora): peft adapters on the text model's linear layers, the coord-token rows of
the embeddings and LM head trainable, the vision tower trained in full or frozen (model.freeze_vision).

The model keeps its class and its own forward: ``apply_lora`` wraps layers in place (peft's LoRA layers and
``trainable_token_indices``), so the learner's ``model.model(...)`` and ``model.lm_head.weight`` work as
before (the wrapped head's ``weight`` is the merged one, with the trained rows in).

The rollout engines serve the merged model under the base model's own parameter names (the reference
CoordExp work got zero valid predictions from an unmerged adapter): ``merged_weights`` computes
W + (alpha / rank) B A per adapted layer, and the base rows with the trained coord rows copied in per
wrapped embedding, without touching the learner's weights (no merge / unmerge round trip that would drift
the frozen base by rounding). Checkpoints hold only the trained tensors (``trainable_state``); the base is
the run's model folder.
"""

from __future__ import annotations

from typing import Iterator

import torch

from coordexp_rl.config import LoraConfig
from coordexp_rl.method.coords import CoordVocab

ADAPTER = "default"  # peft's adapter name; one adapter per model
ADAPTER_FILE = "adapter.safetensors"  # a LoRA checkpoint's trained tensors (learner/checkpoint.py)


def trained_token_ids(vocab: CoordVocab) -> list[int]:
    """The rows of the embeddings and LM head that train: the 1000 coord tokens and the structure tokens
    (added by `add-coord-tokens`, so a pretrained base has never seen them)."""
    return [*vocab.coord_ids, vocab.obj_open, vocab.obj_close, vocab.desc_open, vocab.desc_close,
            vocab.box_open, vocab.box_close]


def apply_lora(model: torch.nn.Module, lora: LoraConfig, vocab: CoordVocab, freeze_vision: bool) -> torch.nn.Module:
    """Wrap ``model`` in place; returns it (its class unchanged). Only the adapters, the coord rows and (not
    ``freeze_vision``) the vision tower require grad afterwards."""
    import peft

    ids = trained_token_ids(vocab)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # tied: peft wraps the LM head too, sharing the embedding's trained rows; untied: the head's own rows
    tokens = {"embed_tokens": ids} if tied else {"embed_tokens": ids, "lm_head": ids}
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), trainable_token_indices=tokens)
    inner = peft.get_peft_model(model, config).base_model.model  # the model itself, its layers now wrapped
    if not freeze_vision:
        for p in inner.model.visual.parameters():
            p.requires_grad_(True)
    return inner


def is_lora(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _base_name(key: str) -> str:
    """A wrapped model's state-dict key in the base model's naming."""
    return key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key or ".trainable_tokens_" in key


def _weights(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.nn.Module | None, bool]]:
    """``(base name, state-dict key, wrapping layer or None, changes)`` per base weight, in state-dict order;
    ``changes``: whether training moves it (an adapted layer, a wrapped embedding, a parameter with grad)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    owners = {}  # state-dict key of a wrapped weight -> the wrapping layer
    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer):
            owners[f"{mname}.base_layer.weight"] = module
        elif isinstance(module, TrainableTokensWrapper):
            owners[f"{mname}.token_adapter.base_layer.weight"] = module
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in model.state_dict():
        if not _is_adapter_key(key):
            owner = owners.get(key)
            yield _base_name(key), key, owner, owner is not None or (key in params and params[key].requires_grad)


def frozen_names(model: torch.nn.Module) -> list[str]:
    """Base names of the weights that training never moves (they need sending once per engine life)."""
    return [name for name, _, _, changes in _weights(model) if not changes]


def merged_weights(model: torch.nn.Module, frozen: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` per base weight, adapters merged in, in state-dict order; ``frozen``: None = all,
    True = only those training never moves, False = only the others.

    A merged tensor is computed when yielded, new each time; the model is not modified. A tied LM head
    comes under its own name too (as in the base model's state dict), merged from the same rows.
    """
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    for name, key, owner, changes in _weights(model):
        if frozen is not None and frozen == changes:
            continue
        # no_grad around the computation only: a generator that yields inside it would leave grad mode off
        # in its consumer (and for good, if it is never run to the end)
        with torch.no_grad():
            tensor = state[key].detach()
            if isinstance(owner, LoraLayer):
                tensor = tensor + owner.get_delta_weight(ADAPTER).to(tensor.dtype)  # W + (alpha / r) B A
            elif owner is not None:  # the base rows, the trained token rows copied in
                tensor = owner.token_adapter.get_merged_weights([ADAPTER])
        yield name, tensor


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that trains (adapters, coord rows, an unfrozen vision tower), by parameter name, as
    contiguous CPU copies: what a checkpoint must hold besides the base model folder."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``trainable_state``'s tensors back; KeyError / ValueError when they are not this model's."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise KeyError(f"trained tensors differ: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(state[name].shape)}, the model's {tuple(p.shape)}")
            p.copy_(state[name])


def checkpoint_record(model_cfg) -> dict | None:
    """What a checkpoint's state.json records of LoRA (None: a full fine-tune): the settings the adapters need
    to be rebuilt on the base model (resume, `coordexp-rl export`)."""
    if not model_cfg.lora.rank:
        return None
    return {**model_cfg.lora.model_dump(), "freeze_vision": model_cfg.freeze_vision}


def record_mismatch(saved: dict | None, model_cfg) -> str | None:
    """Why a checkpoint recorded as ``saved`` cannot resume under ``model_cfg`` (None: it can)."""
    now = checkpoint_record(model_cfg)
    if saved == now:
        return None
    if now is None:
        return (f"a LoRA checkpoint (model.lora.rank={saved['rank']}), this learner trains the full model; resume "
                f"with the checkpoint's model.lora settings {saved}, or export it (coordexp-rl export) and start "
                "a full fine-tune from the merged folder (model.path)")
    if saved is None:
        return (f"a full fine-tune checkpoint, this learner trains LoRA adapters (model.lora.rank={now['rank']}); "
                "resume with model.lora.rank=0, or export it (coordexp-rl export) and start LoRA from the "
                "exported folder (model.path)")
    return f"LoRA settings differ: the checkpoint's {saved}, now {now}; resume with the checkpoint's"


def merged_state_from_checkpoint(base_model: torch.nn.Module, record: dict, state: dict[str, torch.Tensor],
                                 vocab: CoordVocab) -> dict[str, torch.Tensor]:
    """The merged weights of a LoRA checkpoint (``record``: its state.json's, ``state``: its trained tensors)
    on ``base_model`` (wrapped in place): what `coordexp-rl export` writes."""
    settings = {k: v for k, v in record.items() if k != "freeze_vision"}
    model = apply_lora(base_model, LoraConfig(**settings), vocab, record["freeze_vision"])
    load_trainable_state(model, state)
    return dict(merged_weights(model))
