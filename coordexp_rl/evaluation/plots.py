"""PNG plots of evaluation metrics and training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

log = logging.getLogger(__name__)

# Training-curve groups: name -> predicate on a metric key. A key lands in the first group it fits.
CURVE_GROUPS = {
    "losses": lambda k: k.startswith("loss/") or k.endswith("/loss"),
    "mean_iou": lambda k: "iou" in k.lower(),
    "map": lambda k: k.startswith("eval/") and ("AP" in k or "AR" in k or k.endswith("f1")),
}


def plot_iou_histogram(metrics: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of ``metrics["iou_histogram"]`` (IoU of matched pairs, bins of 0.1)."""
    edges, counts = metrics["iou_histogram"]["edges"], metrics["iou_histogram"]["counts"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(edges[:-1], counts, width=0.1, align="edge", edgecolor="black", color="tab:blue")
    mean = metrics.get("mean_iou")
    title = "IoU of matched pairs" + (f" (mean {mean:.3f}, n={sum(counts)})" if mean is not None else " (none)")
    ax.set(title=title, xlabel="IoU", ylabel="pairs", xlim=(0, 1), xticks=edges)
    ax.axvline(metrics.get("iou_threshold", 0.5), color="tab:red", linestyle="--", label="F1 IoU threshold")
    ax.legend()
    return _save(fig, path)


def plot_per_description(metrics: dict[str, Any], path: str | Path, top: int = 25) -> Path:
    """Horizontal bars of GT / predicted / TP counts per description, with F1 in the label."""
    rows = metrics["per_description"][:top]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(rows) + 1.2)))
    ys = range(len(rows))
    for offset, key, color in ((-0.27, "gt", "tab:green"), (0.0, "pred", "tab:orange"), (0.27, "tp", "tab:blue")):
        ax.barh([y + offset for y in ys], [r[key] for r in rows], height=0.27, color=color, label=key.upper())
    ax.set_yticks(list(ys), [f"{r['desc'][:30]}  (F1 {r['f1']:.2f})" for r in rows])
    ax.invert_yaxis()
    shown = f"top {len(rows)} of {len(metrics['per_description'])}" if len(metrics["per_description"]) > top else "all"
    ax.set(title=f"Per description ({shown}, by GT count)", xlabel="boxes")
    ax.legend(loc="lower right")
    return _save(fig, path)


def read_metrics_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg})") from exc
    return rows


def plot_training_curves(metrics_jsonl_path: str | Path, out_dir: str | Path) -> list[Path]:
    """One PNG per metric group (losses, mean IoU, mAP) over steps; a line per (metric, stage).

    Lines look like ``{"step": 10, "stage": "stage1", "loss/total": 1.2, "match/mean_iou": 0.4}``;
    non-numeric values and lines without ``step`` are skipped. Returns the written paths.
    """
    series: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in read_metrics_jsonl(metrics_jsonl_path):
        step, stage = row.get("step"), str(row.get("stage", ""))
        if not isinstance(step, (int, float)):
            continue
        for key, value in row.items():
            if key in ("step", "stage") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            group = next((g for g, fits in CURVE_GROUPS.items() if fits(key)), None)
            if group is not None:
                series[group][(key, stage)].append((float(step), float(value)))
    out_dir = Path(out_dir)
    written = []
    for group, lines in series.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        # One colour per metric, one line style per stage, so a metric stays recognisable across stages.
        keys = sorted({k for k, _ in lines})
        stages = sorted({s for _, s in lines})
        for (key, stage), pts in sorted(lines.items()):
            pts.sort()
            label = f"{key} [{stage}]" if stage else key
            ax.plot([s for s, _ in pts], [v for _, v in pts], color=f"C{keys.index(key) % 10}",
                    linestyle=("-", "--", ":", "-.")[stages.index(stage) % 4],
                    marker="o" if len(pts) < 20 else None, ms=3, label=label)
        ax.set(title=f"Training curves: {group}", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / f"curves_{group}.png"))
    if not written:
        log.warning("%s has no plottable metric lines (need 'step' and loss/iou/eval keys)", metrics_jsonl_path)
    return written


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
