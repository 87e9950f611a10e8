"""The ablation table: each arm's final metrics and Stage-2 cost over seeds, and the questions that pair
two arms (across seeds and paired per seed). ``coordexp_rl.tools.ablate`` runs the arms and calls ``render``.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Headline metrics of the final evaluation, as named in the launcher's results.json. AP with the model's
# own object score (description x box probability); mean IoU class-agnostic, so that it measures boxes.
METRICS = (("AP50", "object_prob/AP50"), ("mAP", "object_prob/mAP"), ("AP50 (constant)", "constant/AP50"),
           ("F1@0.5", "f1@0.5/f1"), ("mean IoU", "mean_iou_class_agnostic"), ("mean IoU (class-matched)", "mean_iou"),
           ("recall 6+", "breakdown/recall@6+"), ("duplicates / image", "breakdown/duplicates_per_image"),
           ("misses / image", "breakdown/misses_per_image"))
# Stage-1's learning curve, from the evaluations eval.every makes (ablate.curve_stats): the mean AP50 over
# Stage-1 (area under the curve / steps) and the first step whose class-agnostic F1 reaches AVERAGE_BOX_F1.
CURVE = ("Stage-1 AP50 AUC", "Stage-1 leaves the average box at step")
AVERAGE_BOX_F1 = 0.2  # below it a run still writes about one average box per object (docs/RESULTS.md)
# The metrics each question compares (across seeds and paired) and the per-seed table shows.
COMPARED = ("AP50", "recall 6+", "duplicates / image", "mean IoU", CURVE[0])
# What each arm's Stage-2 cost, from its run folder's metrics.jsonl (stage_costs).
COSTS = ("Stage-2 compute (units)", "Stage-2 wall s")
EQUAL_COMPUTE_ARM = "stage2_sft_compute"  # its stage2.steps come from the default run's logged compute
BUDGET_ARMS = ("stage2_long",)  # arms whose question is the step budget itself; every other arm keeps the default's


@dataclass(frozen=True)
class Question:
    text: str
    baseline: str  # arm names: "default" or a configs/ablations/<name>.yaml stem
    variant: str


QUESTIONS = (
    Question("Stage-2 EM vs the same number of extra SFT steps from the same Stage-1 state", "stage2_sft", "default"),
    Question("Stage-2 EM vs extra SFT at equal compute", EQUAL_COMPUTE_ARM, "default"),
    Question("CE only vs CE + CoordExp L1/GIoU (both stages, full budget)", "ce_only", "default"),
    Question("Stage-2 lr 2e-4 vs 1e-4 (where Stage-1's cosine ends)", "stage2_lr_high", "default"),
    Question("Stage-2 without vs with the coord-CE term", "no_coord_ce_stage2", "default"),
    Question("CoordExp expectation over all bins vs top-k", "default", "topk_expectation"),
    Question("Stage-2 gate relaxed (default) vs held strict", "gate_held", "default"),
    Question("Stage-1 expectation losses vs + soft CE over neighbouring bins", "default", "coord_soft_ce"),
    Question("Stage-1 expectation losses vs + Wasserstein-1", "default", "coord_w1"),
    Question("Stage-2 CE on the canonical GT vs the GT reordered to the rollout (METHOD 7.2)", "canonical_gt",
             "default"),
    Question("Stage-2 geometry teacher-forced on the GT vs on the rollout's own tokens (METHOD 7.1)", "geo_on_gt",
             "default"),
    Question("Stage-2 gate (IoU > 0.5 -> 0.3) vs a wide gate (IoU > 0.1) from the start", "default", "gate_wide"),
    Question("Stage-2 CE on the GT reordered by every Hungarian pair vs by gated pairs only", "default",
             "gated_order"),
    Question("Stage-2 EM with the GT reordered by gated pairs only vs extra SFT at equal compute", EQUAL_COMPUTE_ARM,
             "gated_order"),
    Question("Stage-2 EM without vs with Stage-1's geometry on every GT box", "default", "gt_geometry"),
    Question("Extra SFT at equal compute vs SFT + the self-context geometry (canonical GT)", EQUAL_COMPUTE_ARM,
             "sft_plus_self_geo"),
    Question("Stage-2 rollouts greedy vs sampled (temperature 0.7)", "default", "sampled_rollouts"),
    Question("Stage-2 sampled rollouts: one vs two per image", "sampled_rollouts", "two_per_image"),
    Question("Stage-2 EM two sampled rollouts per image vs extra SFT at equal compute", EQUAL_COMPUTE_ARM,
             "two_per_image"),
    Question("Stage-2 sampled rollouts: two vs four per image", "two_per_image", "four_per_image"),
    Question("Stage-2 EM four sampled rollouts per image vs extra SFT at equal compute", EQUAL_COMPUTE_ARM,
             "four_per_image"),
    Question("Stage-2 EM without vs with an entropy penalty on the self-context coord distributions",
             "default", "self_entropy"),
    Question("Stage-2 EM: 300 vs 600 steps", "default", "stage2_long"),
    Question("Stage-2 EM at 600 steps vs extra SFT at the 300-step EM compute", EQUAL_COMPUTE_ARM,
             "stage2_long"),
    Question("Stage-1 in the canonical vs a random object order (order invariance)", "default",
             "stage1_random_order"),
    Question("Stage-1 geometry light (L1 1, no GIoU) vs the default's (L1 4 + GIoU 8)", "light_stage1_geo",
             "default"),
)


def final_metrics(results: dict) -> dict[str, float | None]:
    """The last evaluation of a run (after Stage-2; for Stage-1-only arms it repeats the Stage-1 model)."""
    last = results[list(results)[-1]]
    return {name: last.get(key) for name, key in METRICS}


def summarise(values: list[float | None]) -> tuple[float, float, int] | None:
    """(mean, sample std, n) over the seeds that produced a value; None when none did."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"), len(xs)


def verdict(base: tuple[float, float, int] | None, var: tuple[float, float, int] | None) -> str:
    """Compare two (mean, std, n): a difference within both arms' seed spread is called noise."""
    if base is None or var is None:
        return "missing runs"
    diff = var[0] - base[0]
    if min(base[2], var[2]) < 2:
        return f"{diff:+.4f} (one seed: noise unknown)"
    noise = max(base[1], var[1])
    return f"{diff:+.4f} ({'within noise' if abs(diff) <= noise else 'beyond noise'}: seed std {noise:.4f})"


def _cell(s: tuple[float, float, int] | None, fmt: str = ".4f") -> str:
    if s is None:
        return "n/a"
    return f"{s[0]:{fmt}}" if math.isnan(s[1]) else f"{s[0]:{fmt}} ± {s[1]:{fmt}}"


def render(per_arm: dict[str, list[dict | None]], seeds: list[int], scale: float, command: str,
           base: Path | None = None) -> str:
    columns = [m for m, _ in METRICS] + list(COSTS) + list(CURVE)
    stats = {arm: {m: summarise([r.get(m) if r else None for r in runs]) for m in columns}
             for arm, runs in per_arm.items()}
    base_text = (f"Base config: `{shown(base)}` (the 'default' arm; every other arm's YAML layered over it)."
                 if base else "Base config: the embedded defaults (= configs/tiny_cpu.yaml; the 'default' arm).")
    lines = [f"Command: `{command}`", "", base_text,
             f"Seeds {seeds}; step scale {scale:g} (every arm's Stage-1 and Stage-2 steps x {scale:g}). "
             "Values: the final evaluation on the synthetic validation set, mean ± sample std over seeds; AP "
             "scored with the model's object score (description x box probability) unless 'constant' is named, "
             "mean IoU class-agnostic unless 'class-matched' is named. Stage-2 compute: learner tokens x 3 + "
             "rollout tokens x 1 (FLOP-proportional, approximate; coordexp_rl/tools/ablate.py); "
             f"`{EQUAL_COMPUTE_ARM}` gets the default's Stage-2 compute per seed. Stage-2 wall s: comparable "
             "only between runs that had the machine alike (--jobs).", "",
             "| arm | runs ok | " + " | ".join(columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for arm, runs in per_arm.items():
        ok = sum(r is not None for r in runs)
        cells = [_cell(stats[arm][m]) for m, _ in METRICS]
        cells += [_cell(stats[arm][c], fmt) for c, fmt in zip(COSTS + CURVE, (".0f", ".1f", ".4f", ".0f"))]
        lines.append(f"| {arm} | {ok}/{len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", "Questions. 'Across seeds' compares the arms' means with their seed spread; 'paired' takes the "
              "difference seed by seed (both arms of a seed share the model initialisation and data order) and "
              "calls it consistent when every seed moves the same way and the mean difference exceeds its std. "
              "Recall 6+: recall on the images with 6 or more GT objects; duplicates: per image.", "",
              "| question | baseline -> variant | " + " | ".join(f"{m}: across seeds | {m}: paired per seed"
                                                      for m in COMPARED) + " |",
              "|---|---|" + "---|---|" * len(COMPARED)]
    for q in QUESTIONS:
        if q.baseline in stats and q.variant in stats:
            b, v = stats[q.baseline], stats[q.variant]
            pb, pv = per_arm[q.baseline], per_arm[q.variant]
            # n/a: a metric one arm does not have (the Stage-1 curve of an arm that reused the default's Stage-1)
            cells = [f"{verdict(b[m], v[m])} | {paired(pb, pv, m)}" if b[m] and v[m] else "n/a | n/a"
                     for m in COMPARED]
            lines.append(f"| {q.text} | {q.baseline} -> {q.variant} | " + " | ".join(cells) + " |")
    per_seed = (*COMPARED, CURVE[1])
    lines += ["", "Per seed (final evaluation; the Stage-1 curve where the arm ran Stage-1 with eval.every, class-"
              f"agnostic F1 >= {AVERAGE_BOX_F1} counting as out of the average box):", "",
              "| arm | seed | " + " | ".join(per_seed) + " |", "|---|---|" + "---|" * len(per_seed)]
    for arm, runs in per_arm.items():
        for seed, r in zip(seeds, runs):
            cells = ["failed" if r is None else _value(r.get(m)) for m in per_seed]
            lines.append(f"| {arm} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:.0f}" if isinstance(v, int) else f"{v:.4f}"


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def paired(base: list[dict | None], variant: list[dict | None], metric: str) -> str:
    """Per-seed differences variant - baseline (same seed order), their mean ± std and whether they agree.

    >>> paired([{"m": 0.1}, {"m": 0.5}], [{"m": 0.2}, {"m": 0.7}], "m")
    '+0.1500 ± 0.0707 (consistent: +0.1000 +0.2000)'
    """
    diffs = [v[metric] - b[metric] for b, v in zip(base, variant)
             if b and v and b.get(metric) is not None and v.get(metric) is not None]
    if not diffs:
        return "missing runs"
    each = " ".join(f"{d:+.4f}" for d in diffs)
    if len(diffs) < 2:
        return f"{diffs[0]:+.4f} (one seed)"
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    word = "consistent" if same_sign and abs(mean) > std else "not consistent"
    return f"{mean:+.4f} ± {std:.4f} ({word}: {each})"


def write_results(path: Path, table: str, base: Path | None = None) -> None:
    """Replace the block between the ablation markers in ``path`` (or create the file with it); a base config
    has its own markers, so the default's table and, say, the dense task's stay side by side."""
    tag = f" ({shown(base)})" if base else ""
    begin, end = f"<!-- ablation table{tag}: begin -->", f"<!-- ablation table{tag}: end -->"
    block = f"{begin}\n{table}{end}"
    text = path.read_text() if path.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(head + block + rest.split(end, 1)[1])
