"""Ablations: `coordexp-rl ablate [--seeds 0 1 2] [--scale 1.0] [--out docs/RESULTS.md]`.

Runs every arm (the default run and each ``configs/ablations/*.yaml``) for each seed through the real
launcher (`python -m coordexp_rl.launch`, one subprocess each, so one failed arm cannot take the others
down), then writes a table of the final evaluation per arm (mean +- std over seeds) and one line per
question comparing its two arms. Arm configs give every arm the same number of optimizer steps;
``--scale`` multiplies both stages' steps of every arm alike, so budgets stay equal at any scale.

An arm that differs from the default only in ``stage2.*`` keys (the Stage-2 control ``stage2_sft``)
starts from the default run's Stage-1 checkpoint of the same seed instead of recomputing Stage-1: Stage-1
is deterministic on CPU, so the shared state is bit-identical to a recomputed one (equal compute, less
waiting). The default run therefore keeps a checkpoint at its last Stage-1 step; the arm starts as soon as
that checkpoint is complete, beside the default's Stage-2 (with ``--jobs`` > 1).

A run folder that already holds ``results.json`` is read, not rerun: an interrupted ablation resumes (a
folder whose saved config differs, e.g. from another ``--scale``, is refused rather than mixed in).
This module starts processes but never imports Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coordexp_rl.config import Config, load_config

REPO = Path(__file__).resolve().parents[2]
ABLATIONS = REPO / "configs" / "ablations"

# Headline metrics of the final evaluation, as named in the launcher's results.json. AP with the model's
# own object score (description x box probability); mean IoU class-agnostic, so that it measures boxes.
METRICS = (("AP50", "object_prob/AP50"), ("mAP", "object_prob/mAP"), ("AP50 (constant)", "constant/AP50"),
           ("F1@0.5", "f1@0.5/f1"), ("mean IoU", "mean_iou_class_agnostic"), ("mean IoU (class-matched)", "mean_iou"))


@dataclass(frozen=True)
class Question:
    text: str
    baseline: str  # arm names: "default" or a configs/ablations/<name>.yaml stem
    variant: str


QUESTIONS = (
    Question("Stage-2 EM vs the same number of extra SFT steps from the same Stage-1 state", "stage2_sft", "default"),
    Question("CE only vs CE + CoordExp L1/GIoU (both stages, full budget)", "ce_only", "default"),
    Question("Stage-2 lr 2e-4 vs 1e-4 (where Stage-1's cosine ends)", "stage2_lr_high", "default"),
    Question("Stage-2 without vs with the coord-CE term", "no_coord_ce_stage2", "default"),
    Question("CoordExp expectation over all bins vs top-k", "default", "topk_expectation"),
    Question("Stage-2 gate relaxed (default) vs held strict", "gate_held", "default"),
    Question("Stage-1 expectation losses vs + soft CE over neighbouring bins", "default", "coord_soft_ce"),
    Question("Stage-1 expectation losses vs + Wasserstein-1", "default", "coord_w1"),
)


def arm_config(name: str) -> Path | None:
    """The YAML of an arm; None for the default (the embedded defaults)."""
    return None if name == "default" else ABLATIONS / f"{name}.yaml"


def arm_overrides(name: str, seed: int, scale: float, out_dir: Path, extra: list[str]) -> list[str]:
    """Launcher overrides for one (arm, seed): the seed, the scaled step counts, the run folder, and (see the
    module docstring) the Stage-1 checkpoint the default keeps and a Stage-2-only arm starts from."""
    cfg = load_config(arm_config(name), extra)
    stage1 = round(cfg.stage1.steps * scale)
    steps = [f"stage1.steps={stage1}", f"stage2.steps={round(cfg.stage2.steps * scale)}",
             f"matching.curriculum_steps={max(1, round(cfg.matching.curriculum_steps * scale))}"]
    keep = [f"run.checkpoint_every={stage1 if name == 'default' else 0}"]
    if shares_stage1(name, extra):
        keep.append(f"run.resume={stage1_checkpoint(out_dir.parent.parent / 'default' / out_dir.name, stage1)}")
    return [*extra, *steps, f"run.seed={seed}", f"model.tiny_seed={seed}", f"rollout.seed={seed}",
            f"run.out_dir={out_dir}", *keep]


def shares_stage1(name: str, extra: list[str]) -> bool:
    """True for an arm whose config differs from the default's only in Stage-2 settings."""
    if name == "default":
        return False
    changed = _changed_keys(load_config(arm_config(name), extra).model_dump(), load_config(None, extra).model_dump())
    return all(k.startswith("stage2.") or k == "run.out_dir" for k in changed)


def stage1_checkpoint(default_run: Path, stage1_steps: int) -> Path:
    return default_run / "checkpoints" / f"step-{stage1_steps:06d}"


def _wait_for(checkpoint: Path, run: Path, poll_s: float = 2.0) -> None:
    """Block until the default run of this seed has written its Stage-1 ``checkpoint`` (complete), or is no
    longer in progress (its ``running`` marker is gone): the arm starts beside the default's Stage-2."""
    while not (checkpoint / "COMPLETE").exists() and (run / "running").exists():
        time.sleep(poll_s)


class StaleRunError(ValueError):
    """A run folder holds results of another config (another --scale or overrides)."""


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) and k != "tiny_size":
            keys += _changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            keys.append(f"{prefix}{k}")
    return keys


def check_reusable(out: Path, expected: Config) -> None:
    """Refuse to read back a run whose saved config.yaml differs from what this call would run."""
    saved = out / "config.yaml"
    if saved.exists():
        changed = _changed_keys(load_config(saved).model_dump(), expected.model_dump())
        if changed:
            raise StaleRunError(f"{out} holds a run with another config (differs in {', '.join(changed)}); "
                                "pass another --runs-dir or remove that folder")


def run_arm(name: str, seed: int, scale: float, runs_dir: Path, extra: list[str]) -> dict | None:
    """Run (or read back) one arm; returns the launcher's results (per evaluation label), None on failure."""
    out = runs_dir / name / f"seed{seed}"
    done = out / "results.json"
    overrides = arm_overrides(name, seed, scale, out, extra)
    if done.exists():
        check_reusable(out, load_config(arm_config(name), overrides))
        return json.loads(done.read_text())
    if shares_stage1(name, extra):
        resume = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.resume="))
        _wait_for(Path(resume), runs_dir / "default" / f"seed{seed}")
        if not Path(resume).exists():
            print(f"[ablate] {name} seed {seed}: no Stage-1 checkpoint {resume} (run the default arm too); "
                  "skipped", flush=True)
            return None
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "coordexp_rl.launch"]
    if arm_config(name):
        cmd += ["--config", str(arm_config(name))]
    cmd += overrides
    log_path = out / "launch.log"
    print(f"[ablate] {name} seed {seed}: {' '.join(cmd[1:])} (log: {log_path})", flush=True)
    start = time.perf_counter()
    try:
        with log_path.open("w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        (out / "running").unlink(missing_ok=True)  # run() marked a default run: its Stage-2-only arms go on
    minutes = (time.perf_counter() - start) / 60
    if rc != 0 or not done.exists():
        print(f"[ablate] {name} seed {seed}: FAILED (exit {rc}) after {minutes:.1f} min; see {log_path}", flush=True)
        return None
    print(f"[ablate] {name} seed {seed}: done in {minutes:.1f} min", flush=True)
    return json.loads(done.read_text())


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


def _cell(s: tuple[float, float, int] | None) -> str:
    if s is None:
        return "n/a"
    return f"{s[0]:.4f}" if math.isnan(s[1]) else f"{s[0]:.4f} ± {s[1]:.4f}"


def render(per_arm: dict[str, list[dict | None]], seeds: list[int], scale: float, command: str) -> str:
    stats = {arm: {m: summarise([r[m] if r else None for r in runs]) for m, _ in METRICS}
             for arm, runs in per_arm.items()}
    lines = [f"Command: `{command}`", "",
             f"Seeds {seeds}; step scale {scale:g} (every arm's Stage-1 and Stage-2 steps x {scale:g}). "
             "Values: the final evaluation on the synthetic validation set, mean ± sample std over seeds; AP "
             "scored with the model's object score (description x box probability) unless 'constant' is named, "
             "mean IoU class-agnostic unless 'class-matched' is named.", "",
             "| arm | runs ok | " + " | ".join(m for m, _ in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for arm, runs in per_arm.items():
        ok = sum(r is not None for r in runs)
        lines.append(f"| {arm} | {ok}/{len(runs)} | " + " | ".join(_cell(stats[arm][m]) for m, _ in METRICS) + " |")
    lines += ["", "Questions. 'Across seeds' compares the arms' means with their seed spread; 'paired' takes the "
              "difference seed by seed (both arms of a seed share the model initialisation and data order) and "
              "calls it consistent when every seed moves the same way and the mean difference exceeds its std.", "",
              "| question | baseline -> variant | AP50: across seeds | AP50: paired per seed | mean IoU: across seeds "
              "| mean IoU: paired per seed |", "|---|---|---|---|---|---|"]
    for q in QUESTIONS:
        if q.baseline in stats and q.variant in stats:
            b, v = stats[q.baseline], stats[q.variant]
            pb, pv = per_arm[q.baseline], per_arm[q.variant]
            lines.append(f"| {q.text} | {q.baseline} -> {q.variant} | {verdict(b['AP50'], v['AP50'])} | "
                         f"{paired(pb, pv, 'AP50')} | {verdict(b['mean IoU'], v['mean IoU'])} | "
                         f"{paired(pb, pv, 'mean IoU')} |")
    return "\n".join(lines) + "\n"


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


def write_results(path: Path, table: str) -> None:
    """Replace the block between the ablation markers in ``path`` (or create the file with it)."""
    begin, end = "<!-- ablation table: begin -->", "<!-- ablation table: end -->"
    block = f"{begin}\n{table}{end}"
    text = path.read_text() if path.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.write_text(head + block + rest.split(end, 1)[1])


def all_arms() -> list[str]:
    return ["default", *sorted(p.stem for p in ABLATIONS.glob("*.yaml"))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arms", nargs="+", default=None, help="arm names (default: 'default' and every "
                        "configs/ablations/*.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every arm's steps (equal budgets)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each its own Ray and vLLM; two fit a "
                        "2-core machine: the tiny model is overhead-bound)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md", help="markdown file to update")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every arm")


def run(args: argparse.Namespace) -> int:
    arms = args.arms or all_arms()
    unknown = [a for a in arms if a != "default" and not arm_config(a).exists()]
    if unknown:
        print(f"unknown arms {unknown}; known: {all_arms()}", file=sys.stderr)
        return 2
    fixed = [o for o in args.overrides if o.split("=", 1)[0] in ("stage1.steps", "stage2.steps")]
    if fixed:
        print(f"{fixed}: the arms set their own step budgets; use --scale to shrink or grow all of them alike",
              file=sys.stderr)
        return 2
    if args.scale <= 0:
        print(f"--scale {args.scale}: must be > 0", file=sys.stderr)
        return 2
    runs_dir = args.runs_dir.resolve()
    # Arm-major (partial results compare whole arms), the default first: other arms may wait on its Stage-1.
    jobs = [(arm, seed) for arm in sorted(arms, key=lambda a: a != "default") for seed in args.seeds]
    # Mark the default runs to come as running before any job starts: with --jobs > 1 a Stage-2-only arm of
    # the same seed may reach its wait before the default's own job has begun.
    marked = [runs_dir / "default" / f"seed{s}" / "running" for s in args.seeds if "default" in arms
              and not (runs_dir / "default" / f"seed{s}" / "results.json").exists()]
    for m in marked:
        m.parent.mkdir(parents=True, exist_ok=True)
        m.touch()
    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on launcher subprocesses
            results = list(pool.map(lambda job: run_arm(*job, args.scale, runs_dir, args.overrides), jobs))
    except StaleRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for m in marked:
            m.unlink(missing_ok=True)
    per_arm: dict[str, list[dict | None]] = {arm: [] for arm in arms}
    for (arm, _), r in zip(jobs, results):
        per_arm[arm].append(final_metrics(r) if r else None)
    command = "coordexp-rl ablate " + " ".join(
        [*(["--arms", *args.arms] if args.arms else []), "--seeds", *map(str, args.seeds),
         "--scale", f"{args.scale:g}", *args.overrides])
    table = render(per_arm, args.seeds, args.scale, command)
    write_results(args.out, table)
    print(table)
    print(f"[ablate] table written into {args.out}")
    return 0 if all(r is not None for runs in per_arm.values() for r in runs) else 1
