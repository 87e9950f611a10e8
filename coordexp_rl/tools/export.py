"""`coordexp-rl export --checkpoint DIR --out DIR`: any complete checkpoint of a run (a mid-run ``step-N``,
``final``, ``best``'s) as a model folder that transformers and vLLM load, like the run's ``final_model``.

A checkpoint holds the weights and the training state, not the model's config, tokenizer or processor:
those come from the base model the run trained from, the folder its ``state.json`` records as
``model_path``; ``--base`` names it when that folder has moved (or for checkpoints written before the
record). The export loads the base on the CPU in float32 (the learner's master weights), puts the
checkpoint's weights in (a LoRA checkpoint: its adapters merged into the base), and writes both with
``save_pretrained``. `coordexp-rl infer --model CHECKPOINT`
exports into a temporary folder this way first.
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
    """A learner checkpoint (state.json beside model.safetensors), not a model folder (config.json)."""
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
    from learner.checkpoint import read_state

    model, processor, vocab = load_model_and_processor(base_model(checkpoint, base), "float32", "cpu")
    record, merged = read_state(checkpoint).get("lora"), None
    try:
        if record:  # LoRA: the base with the checkpoint's adapters merged in (learner/lora.py)
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
