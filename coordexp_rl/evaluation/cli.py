"""Score predictions against ground truth: COCO box mAP (constant and coord-probability scores), F1 at
IoU 0.5, mean IoU, parse-failure and duplicate rates. Prints a JSON summary; with --out also writes
metrics.json, plots, box overlays and report.md. With --coco-ann: the official COCO results files and
their COCOeval numbers against the annotation file (coordexp_rl.evaluation.coco_official)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coordexp_rl.evaluation.coco import SCORE_FIELDS, SCORE_MODES
from coordexp_rl.evaluation.metrics import evaluate_paired
from coordexp_rl.evaluation.records import load_jsonl, pair_records
from coordexp_rl.evaluation.report import summary, write_outputs
from coordexp_rl.evaluation.robustness import boundary_report_paired


def iou_threshold(text: str) -> float:
    """An IoU threshold in (0, 1]: outside it (or NaN) every pair matches or none does, whatever the input."""
    value = float(text)
    if not 0.0 < value <= 1.0:  # False for NaN too
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", type=Path, default=None, help="ground-truth JSONL (data contract); optional with "
                        "--coco-ann")
    parser.add_argument("--pred", required=True, type=Path, help="predictions JSONL (one line per GT record)")
    parser.add_argument("--out", type=Path, default=None, help="folder for metrics.json, plots, overlays, report.md")
    parser.add_argument("--image-root", type=Path, default=None, help="folder the GT image paths are relative to "
                        "(default: the GT file's folder)")
    parser.add_argument("--overlays", type=int, default=8, help="number of images to draw boxes on (0: none)")
    parser.add_argument("--iou-thr", type=iou_threshold, default=0.5, help="IoU threshold of F1 matching, in (0, 1]")
    parser.add_argument("--score-modes", default=None,
                        help=f"comma-separated COCO score modes from {SCORE_MODES} (default: constant plus every "
                             "mode whose score field the predictions carry)")
    parser.add_argument("--coco-ann", type=Path, default=None,
                        help="official COCO instances_*.json: also write COCO results files and score them against "
                             "it (crowd regions, small/medium/large) as the papers do (docs/COCO.md)")
    parser.add_argument("--coco-backend", choices=("faster", "pycocotools"), default="faster",
                        help="COCOeval implementation for --coco-ann (faster-coco-eval, or the reference)")


def run(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in (args.score_modes or ",".join(SCORE_MODES)).split(",") if m.strip())
    bad = [m for m in modes if m not in SCORE_MODES]
    if bad or not modes:
        print(f"error: unknown or no --score-modes {bad}; choose from {SCORE_MODES}", file=sys.stderr)
        return 2
    if args.gt is None and args.coco_ann is None:
        print("error: give --gt (contract JSONL), --coco-ann (COCO instances_*.json), or both", file=sys.stderr)
        return 2
    try:
        if args.score_modes is None:  # only the modes every predicted object has a score for
            preds = load_jsonl(args.pred)
            modes = tuple(m for m in modes if m == "constant" or _carries(preds, m))
        out = official(args, modes) if args.coco_ann is not None else {}
        if args.gt is not None:
            out = {**contract_metrics(args, modes), **({"coco_official": out} if out else {})}
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2))
    return 0


def official(args: argparse.Namespace, modes: tuple[str, ...]) -> dict:
    """The official COCO scoring; writes coco_results_<mode>.json and coco_metrics.json under --out."""
    from coordexp_rl.evaluation.coco_official import evaluate_official

    metrics = evaluate_official(args.coco_ann, load_jsonl(args.pred), modes, args.coco_backend, args.out)
    if args.out is not None:
        (args.out / "coco_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def contract_metrics(args: argparse.Namespace, modes: tuple[str, ...]) -> dict:
    gt_raw, pred_raw = load_jsonl(args.gt), load_jsonl(args.pred)
    gts, preds = pair_records(gt_raw, pred_raw)
    metrics = evaluate_paired(gts, preds, args.iou_thr, modes)
    metrics["quantisation_boundary"] = boundary_report_paired(gts, preds)
    metrics["inputs"] = {"gt": str(args.gt), "pred": str(args.pred)}
    if args.out is not None:
        root = args.image_root if args.image_root is not None else args.gt.parent
        write_outputs(metrics, gts, preds, args.out, root, args.overlays)
    return summary(metrics)


def _carries(pred_records: list[dict], mode: str) -> bool:
    """Every predicted object has the score field ``mode`` reads (vacuously true without objects)."""
    return all(obj.get(SCORE_FIELDS[mode]) is not None
               for rec in pred_records for obj in (rec.get("objects") or []) if isinstance(obj, dict))
