"""`coordexp-rl export --checkpoint DIR --out DIR`: any complete checkpoint of a run (a mid-run ``step-N``,
``final``, ``best``'s) as a model folder that transformers and vLLM load, like the run's ``final_model``.

A checkpoint holds the weights and the training state, not the model's config, tokenizer or processor:
those come from the base model the run trained from, the folder its ``state.json`` records as
``model_path``; ``--base`` names it when that folder has moved (or for checkpoints written before the
record). The export loads the base on the CPU in its own dtype (its config.json's: what it is served in),
puts the checkpoint's weights in (cast; a LoRA checkpoint: its adapters merged into the base), and writes
both with ``save_pretrained``. A sharded checkpoint (an
FSDP learner's) is read a group of whole tensors at a time (learner/sharded_files.read_tensors), so the
float32 master weights are never whole in memory. `coordexp-rl infer --model CHECKPOINT` exports into a
temporary folder this way first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from coordexp_rl.errors import UserError, add_force_argument, refuse_overwrite


class ExportError(UserError):
    """A folder that is not a complete checkpoint, or a base model that cannot be found."""


def is_checkpoint(folder: Path) -> bool:
    """A learner checkpoint (state.json beside its weights), not a model folder (config.json)."""
    return (folder / "state.json").is_file() and not (folder / "config.json").is_file()


def base_model(checkpoint: Path, base: Path | None = None) -> Path:
    """The model folder a checkpoint's config and tokenizer come from (``base``, else the recorded one)."""
    from learner.checkpoint import read_state

    if (checkpoint / "config.json").is_file():
        raise ExportError(f"{checkpoint}: a model folder already (it has a config.json), not a checkpoint")
    recorded = read_state(checkpoint).get("model_path")  # CheckpointError: incomplete, damaged, foreign
    found = base or (Path(recorded) if recorded else None)
    if found is None:
        raise ExportError(f"{checkpoint}: its state.json records no base model; pass --base (the run's model.path, "
                          "or for the tiny model the folder its launch.log names)")
    if not (found / "config.json").is_file():
        where = "--base" if base else f"the base model recorded in {checkpoint / 'state.json'}"
        raise ExportError(f"{found}: {where} is not a model folder (no config.json); pass --base")
    return found


def export_checkpoint(checkpoint: Path, out: Path, base: Path | None = None) -> Path:
    """Write ``checkpoint``'s weights with its base's config, tokenizer and processor into ``out``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from coordexp_rl.modeling.load import load_model_and_processor
    from learner.checkpoint import SHARDS, read_state

    folder = base_model(checkpoint, base)
    model, processor, vocab = load_model_and_processor(folder, base_dtype(folder), "cpu")
    state = read_state(checkpoint)
    record, merged = state.get("lora"), None
    try:
        if state.get("layout") == "sharded":
            fill_from_shards(model, checkpoint / SHARDS)
        elif record:  # LoRA: the base with the checkpoint's adapters merged in (learner/lora.py)
            from safetensors.torch import load_file

            from learner.lora import ADAPTER_FILE, merged_state_from_checkpoint

            merged = merged_state_from_checkpoint(model, record, load_file(str(checkpoint / ADAPTER_FILE)), vocab)
        else:
            load_model(model, str(checkpoint / "model.safetensors"))  # strict: every weight, names as saved
    except (SafetensorError, RuntimeError, KeyError, ValueError) as exc:  # torn, or another model's weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{checkpoint}: its weights do not load into the base model ({first})") from None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=merged)
    processor.save_pretrained(out)
    return out


def base_dtype(folder: Path) -> str:
    """The dtype a model folder's config.json names (float32 when it names none)."""
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def fill_from_shards(model, shards: Path, group_bytes: int = 1 << 30) -> None:
    """Every weight of ``model`` from a sharded checkpoint's folder, about ``group_bytes`` read at a time."""
    import torch

    from learner import sharded_files

    params = model.state_dict()  # tied names share one tensor: filled twice, the same values
    missing = sorted(set(params) - set(sharded_files.tensor_specs(shards, "model.")))
    if missing:
        raise ExportError(f"{shards.parent}: its weights do not load into the base model (no {missing[0]}; "
                          f"{len(missing)} weights missing)")
    with torch.no_grad():
        for name, tensor in sharded_files.read_tensors(shards, params, "model.", group_bytes):
            if tensor.shape != params[name].shape:
                raise ExportError(f"{shards.parent}: its weights do not load into the base model ({name}: shape "
                                  f"{tuple(tensor.shape)} in the checkpoint, {tuple(params[name].shape)} in the base)")
            params[name].copy_(tensor)


@contextlib.contextmanager
def model_folder(path: Path, base: Path | None = None) -> Iterator[Path]:
    """``path`` itself for a model folder; for a checkpoint, its export in a temporary folder (removed after)."""
    if not is_checkpoint(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="coordexp-export-") as tmp:
        print(f"{path} is a checkpoint: exporting it to {tmp} first", file=sys.stderr)
        yield export_checkpoint(path, Path(tmp) / "model", base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder, e.g. "
                        "runs/default/checkpoints/step-001000")
    parser.add_argument("--out", required=True, type=Path, help="the model folder to write")
    parser.add_argument("--base", type=Path, default=None, help="the base model folder (default: the one the "
                        "checkpoint's state.json records)")
    add_force_argument(parser)


def run(args: argparse.Namespace) -> int:
    refuse_overwrite(args.out, args.force, inputs=(args.checkpoint, args.base))
    out = export_checkpoint(args.checkpoint, args.out, args.base)
    print(json.dumps({"checkpoint": str(args.checkpoint), "out": str(out)}))
    return 0
