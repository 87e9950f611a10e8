"""The `coordexp-rl` console script: one subcommand per module.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their command runs, so `coordexp-rl --help` stays fast.

A config or data error (``ConfigError``, ``DataError``: something the user fixes in a config or a data
file) ends any command with its message on stderr and exit code 2, no traceback; ``--debug`` (anywhere on
the command line) prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from coordexp_rl.errors import report_user_error

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("coordexp_rl.modeling.tiny",
                        "build the tiny offline Qwen3-VL used by tests and the default run"),
    "add-coord-tokens": ("coordexp_rl.modeling.coord_tokens",
                         "add and initialise the 1000 coord tokens in a Qwen3-VL folder"),
    "synth": ("coordexp_rl.data.synth", "write the synthetic shapes detection set (PNG + JSONL)"),
    "validate": ("coordexp_rl.data.validate", "check a JSONL file against the data contract"),
    "convert": ("coordexp_rl.data.convert", "convert COCO / Pascal VOC / RefCOCO annotations to contract JSONL"),
    "launch": ("coordexp_rl.driver.driver", "run Stage-1 and the Stage-2 EM loop on Ray (the main job)"),
    "infer": ("coordexp_rl.tools.infer", "generate, parse and write predictions for a JSONL file"),
    "export": ("coordexp_rl.tools.export", "turn a checkpoint (mid-run or final) into a model folder"),
    "eval": ("coordexp_rl.evaluation.cli", "score predictions against ground truth (COCO mAP, F1, IoU)"),
    "bench": ("coordexp_rl.tools.bench", "benchmarks that print JSON"),
    "ablate": ("coordexp_rl.tools.ablate", "run the ablation arms over seeds and write docs/RESULTS.md"),
    "gpu-check": ("coordexp_rl.tools.gpu_check", "the prepared GPU check: CUDA paths step by step, JSON lines"),
}

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = argparse.ArgumentParser(prog="coordexp-rl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of config and data errors too (accepted anywhere)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse only the command name here; the command's own parser handles the rest (and its --help).
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()
    module = importlib.import_module(COMMANDS[name][0])
    command_parser = argparse.ArgumentParser(prog=f"coordexp-rl {name}", description=module.__doc__)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    args.debug = debug or getattr(args, "debug", False)  # the launcher's own handler reads it too
    try:
        return int(module.run(args) or 0)
    except Exception as exc:
        code = report_user_error(exc, args.debug)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
