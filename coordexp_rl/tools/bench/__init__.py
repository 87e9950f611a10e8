"""Benchmarks that print JSON: ``coordexp-rl bench SUB ...`` (each compares two things in one run)."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help); each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "loss": ("coordexp_rl.tools.bench.loss",
             "Stage-2 loss path (chunked CE + coord-row CoordExp) vs full-vocab logits"),
    "data": ("coordexp_rl.tools.bench.data",
             "convert / validate / load at COCO size: time and peak memory, image checks on vs off"),
    "stage1": ("coordexp_rl.tools.bench.stage1",
               "Stage-1 learning curve in one process: train, greedy-evaluate every N steps"),
    "rollout": ("coordexp_rl.tools.bench.rollout",
                "rollout throughput: vLLM vs transformers engine, actor layer vs bare engine, 1 vs 2 actors"),
    "sync": ("coordexp_rl.tools.bench.sync",
             "weight sync seconds: object store and broadcast vs the in-process load_state_dict floor"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(SUBCOMMANDS[args.bench][0]).run(args) or 0)
