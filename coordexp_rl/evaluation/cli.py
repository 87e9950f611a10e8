"""Score predictions against ground truth: COCO box mAP (constant and coord-probability scores), F1 at
IoU 0.5, mean IoU, parse-failure and duplicate rates. Prints a JSON summary; with --out also writes
metrics.json, plots, box overlays and report.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coordexp_rl.evaluation.coco import SCORE_MODES
from coordexp_rl.evaluation.metrics import evaluate_paired
from coordexp_rl.evaluation.records import load_jsonl, pair_records
from coordexp_rl.evaluation.report import summary, write_outputs
from coordexp_rl.evaluation.robustness import boundary_report_paired


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth JSONL (data contract)")
    parser.add_argument("--pred", required=True, type=Path, help="predictions JSONL (one line per GT record)")
    parser.add_argument("--out", type=Path, default=None, help="folder for metrics.json, plots, overlays, report.md")
    parser.add_argument("--image-root", type=Path, default=None, help="folder the GT image paths are relative to "
                        "(default: the GT file's folder)")
    parser.add_argument("--overlays", type=int, default=8, help="number of images to draw boxes on (0: none)")
    parser.add_argument("--iou-thr", type=float, default=0.5, help="IoU threshold of F1 matching")
    parser.add_argument("--score-modes", default=None,
                        help=f"comma-separated COCO score modes from {SCORE_MODES} (default: constant plus every "
                             "mode whose score field the predictions carry)")


def run(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in (args.score_modes or ",".join(SCORE_MODES)).split(",") if m.strip())
    bad = [m for m in modes if m not in SCORE_MODES]
    if bad:
        print(f"error: unknown --score-modes {bad}; choose from {SCORE_MODES}", file=sys.stderr)
        return 2
    try:
        gt_raw, pred_raw = load_jsonl(args.gt), load_jsonl(args.pred)
        gts, preds = pair_records(gt_raw, pred_raw)
        if args.score_modes is None:
            modes = tuple(m for m in modes if m == "constant" or _carries(preds, m))
        metrics = evaluate_paired(gts, preds, args.iou_thr, modes)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics["quantisation_boundary"] = boundary_report_paired(gts, preds)
    metrics["inputs"] = {"gt": str(args.gt), "pred": str(args.pred)}
    if args.out is not None:
        root = args.image_root if args.image_root is not None else args.gt.parent
        write_outputs(metrics, gts, preds, args.out, root, args.overlays)
    print(json.dumps(summary(metrics), indent=2))
    return 0


def _carries(preds, mode: str) -> bool:
    """Every predicted object has the score ``mode`` reads (vacuously true without objects)."""
    scores = [s for p in preds for s in (p.object_scores if mode == "object_prob" else p.scores)]
    return all(s is not None for s in scores)
