"""A short Markdown report of one ``evaluate`` result, the JSON summary the CLI prints, and the evaluation
folder (metrics, plots, overlays, report) that `coordexp-rl eval --out` and the launcher write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coordexp_rl.evaluation.breakdown import render_markdown as breakdown_markdown
from coordexp_rl.evaluation.breakdown import summary_items as breakdown_summary


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: a flat dict small enough to print."""
    out: dict[str, Any] = {k: metrics[k] for k in ("num_images", "num_gt_boxes", "num_pred_boxes")}
    for mode, r in metrics["coco"].items():
        for key, value in r.items():
            out[f"{mode}/{key}"] = value
    for key in ("precision", "recall", "f1"):
        out[f"f1@{metrics['iou_threshold']}/{key}"] = metrics["f1"][key]
    out["f1_class_agnostic"] = metrics["f1_class_agnostic"]["f1"]
    out["mean_iou"] = metrics["mean_iou"]
    out["mean_iou_class_agnostic"] = metrics["mean_iou_class_agnostic"]
    out["parse_failure_rate"] = metrics["parse"]["failure_rate"]
    out["duplicate_rate"] = metrics["duplicate_rate"]
    out["unmatched_desc_rate"] = metrics["unmatched_desc"]["rate"]
    if "breakdown" in metrics:
        out.update(breakdown_summary(metrics["breakdown"]))
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render_markdown(metrics: dict[str, Any], images: dict[str, str] | None = None, top: int = 20) -> str:
    """Report text; ``images`` maps a caption to a path relative to the report."""
    m = metrics
    lines = [
        "# Detection evaluation",
        "",
        f"{m['num_images']} images, {m['num_gt_boxes']} GT boxes, {m['num_pred_boxes']} predicted boxes.",
        "",
        "## COCO box AP",
        "",
        "| score mode | mAP | AP50 | AP75 | AR@100 |",
        "|---|---|---|---|---|",
    ]
    for mode, r in m["coco"].items():
        lines.append(f"| {mode} | {_fmt(r['mAP'])} | {_fmt(r['AP50'])} | {_fmt(r['AP75'])} | {_fmt(r['AR100'])} |")
    lines += ["", *[f"- {mode}: {m['notes'][mode]}" for mode in m["coco"] if mode in m["notes"]],
              f"- unmatched descriptions: {m['notes']['unmatched_desc']}", "",
              f"## Matching at IoU >= {m['iou_threshold']}", "",
              "| | precision | recall | F1 | TP | FP | FN |", "|---|---|---|---|---|---|---|"]
    for name, key in (("per description", "f1"), ("class-agnostic", "f1_class_agnostic")):
        r = m[key]
        lines.append(f"| {name} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} | "
                     f"{r['tp']} | {r['fp']} | {r['fn']} |")
    p = m["parse"]
    lines += ["", f"- {m['notes']['matching']}",
              f"- mean IoU of matched pairs: {_fmt(m['mean_iou'])} (true positives only: {_fmt(m['mean_iou_tp'])}; "
              f"class-agnostic, descriptions ignored: {_fmt(m['mean_iou_class_agnostic'])})",
              f"- parse: {p['ok']} ok, {p['partial']} partial, {p['failed']} failed "
              f"(failure rate {_fmt(p['failure_rate'])}; failed outputs count as empty predictions)",
              f"- duplicate rate: {_fmt(m['duplicate_rate'])}; predictions with an unknown description: "
              f"{_fmt(m['unmatched_desc']['rate'])}", "",
              "## Per description", "", "| desc | GT | pred | TP | F1 | " +
              " | ".join(f"AP50 {mode}" for mode in m["coco"]) + " |",
              "|---|---|---|---|---|" + "---|" * len(m["coco"])]
    for r in m["per_description"][:top]:
        aps = " | ".join(_fmt(r.get(f"AP50_{mode}")) for mode in m["coco"])
        lines.append(f"| {r['desc']} | {r['gt']} | {r['pred']} | {r['tp']} | {_fmt(r['f1'])} | {aps} |")
    if len(m["per_description"]) > top:
        lines.append(f"\n({len(m['per_description']) - top} more rows in metrics.json)")
    if "breakdown" in m:
        lines += ["", *breakdown_markdown(m["breakdown"])]
    if images:
        lines += ["", "## Plots", ""] + [f"![{caption}]({path})" for caption, path in images.items()]
    return "\n".join(lines) + "\n"


def write_outputs(metrics: dict, gts: list, preds: list, out: Path, image_root: Path, overlays: int = 8) -> None:
    """``out``: metrics.json, IoU histogram, per-description plot, ``overlays`` box overlays, report.md.
    ``gts`` / ``preds``: paired ImageRecords (records.pair_records); `eval --out` and the launcher call it."""
    # Imported here: matplotlib and PIL are only needed when writing files.
    from coordexp_rl.evaluation.overlays import write_overlays
    from coordexp_rl.evaluation.plots import plot_iou_histogram, plot_per_description

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    images = {"IoU histogram": plot_iou_histogram(metrics, out / "iou_histogram.png").name}
    if metrics["per_description"]:
        images["Per description"] = plot_per_description(metrics, out / "per_description.png").name
    if overlays > 0:
        for path in write_overlays(gts, preds, image_root, out / "overlays", overlays):
            images[f"overlay {path.stem}"] = f"overlays/{path.name}"
    (out / "report.md").write_text(render_markdown(metrics, images), encoding="utf-8")
