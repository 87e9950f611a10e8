"""Ablations: `coordexp-rl ablate [--config BASE.yaml] [--seeds 0 1 2] [--scale 1.0] [--out docs/RESULTS.md]`.

Runs every arm (the default run and each ``configs/ablations/*.yaml``) for each seed through the real
launcher (`python -m coordexp_rl.launch`, one subprocess each, so one failed arm cannot take the others
down), then writes a table of the final evaluation per arm (mean +- std over seeds), each arm's Stage-2
compute and wall time, and one line per question comparing its two arms. Arm configs give every arm the
same number of optimizer steps; ``--scale`` multiplies both stages' steps of every arm alike, so budgets
stay equal at any scale.

Base config: ``--config configs/dense_cpu.yaml`` runs every arm on top of that YAML (the arm's YAML layered
over it, `load_config` with both files); the "default" arm is then the base config itself. Without it the
base is the embedded defaults (= configs/tiny_cpu.yaml). The table names its base, and with a base config
it goes into its own marked block of ``--out``.

Stage-1 reuse: an arm that differs from the default only in keys that leave Stage-1's weights unchanged
(``coordexp_rl.config.STAGE2_ONLY_KEYS``: stage2.*, matching.*, the Stage-2 loss weights, evaluation, the
rollout side's sampling, the run folder) starts from the default run's Stage-1 checkpoint of the same seed
instead of recomputing Stage-1: Stage-1 is deterministic on CPU, so the shared state is bit-identical to a
recomputed one (equal compute, less waiting). An arm that changes anything Stage-1 reads runs Stage-1 again.
The default run therefore keeps a checkpoint at its last Stage-1 step; the arm starts as soon as that
checkpoint is complete, beside the default's Stage-2 (with ``--jobs`` > 1).

Compute: every learner step logs ``compute/learner_tokens`` (tokens through forward + backward) and every
Stage-2 EM step ``compute/rollout_tokens`` (prompt + generated tokens of the rows it consumed). A
FLOP-proportional unit, an approximation (vision tower, padding, attention's quadratic term, evaluation
and rows dropped as stale are not counted): a learner token costs 3 units (forward + backward ~ 3
forwards), a rollout token 1 (one forward). The SFT control comes twice: ``stage2_sft`` spends the same
number of Stage-2 steps on more SFT (equal steps); ``stage2_sft_compute`` spends the same compute: its
Stage-2 steps, per seed, are the default run's Stage-2 compute (summed over its steps in its
``metrics.jsonl``) divided by one SFT step's (3 x the mean ``compute/learner_tokens`` of the default run's
Stage-1 steps), so it runs after that seed's default arm has finished. Wall time per stage comes from the
records' ``time``: Stage-2 from the record before its first step to its last step (with ``--jobs`` > 1
the runs shared the machine, so wall times are only comparable within one call).

A run folder that already holds ``results.json`` is read, not rerun: an interrupted ablation resumes (a
folder whose saved config differs, e.g. from another ``--scale``, is refused rather than mixed in).
This module starts processes but never imports Ray.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordexp_rl.config import Config, changed_settings, is_stage2_only, load_config, stage2_lr
from coordexp_rl.tools.ablate_table import (
    AVERAGE_BOX_F1,
    COSTS,
    CURVE,
    EQUAL_COMPUTE_ARM,
    REPO,
    final_metrics,
    render,
    shown,
    write_results,
)

ABLATIONS = REPO / "configs" / "ablations"

# The compute unit (module docstring): units per token of each logged counter; an approximation of FLOPs.
COMPUTE_UNITS = {"compute/learner_tokens": 3, "compute/rollout_tokens": 1}


def arm_config(name: str) -> Path | None:
    """The arm's own YAML; None for the default (the base config alone)."""
    return None if name == "default" else ABLATIONS / f"{name}.yaml"


def arm_configs(name: str, base: Path | None = None) -> list[Path]:
    """The YAML files of an arm, layered in this order: the base config (if any), then the arm's own."""
    return [p for p in (base, arm_config(name)) if p]


def arm_overrides(name: str, seed: int, scale: float, out_dir: Path, extra: list[str], base: Path | None = None,
                  stage2_steps: int | None = None) -> list[str]:
    """Launcher overrides for one (arm, seed): the seed, the scaled step counts (``stage2_steps``, when given,
    replaces Stage-2's: the equal-compute arm), the run folder, and (see the module docstring) the Stage-1
    checkpoint the default keeps and a Stage-2-only arm starts from."""
    cfg = load_config(arm_configs(name, base), extra)
    stage1 = round(cfg.stage1.steps * scale)
    stage2 = round(cfg.stage2.steps * scale) if stage2_steps is None else stage2_steps
    steps = [f"stage1.steps={stage1}", f"stage2.steps={stage2}",
             f"matching.curriculum_steps={max(1, round(cfg.matching.curriculum_steps * scale))}"]
    if cfg.eval.every:  # the learning curve keeps its number of points
        every = max(1, round(cfg.eval.every * scale))
        steps.append(f"eval.every={every if every < stage1 else 0}")
    # ablate owns its runs folder: a folder without results.json holds an interrupted run, rerun from scratch
    keep = [f"run.checkpoint_every={stage1 if name == 'default' else 0}", "run.overwrite=true"]
    if shares_stage1(name, extra, base):
        keep.append(f"run.resume={stage1_checkpoint(out_dir.parent.parent / 'default' / out_dir.name, stage1)}")
    # A pretrained tiny model (model.tiny_pretrain_steps) is one model for every seed, as a real VLM is: the
    # seeds vary the fine-tuning (data order, rollouts); otherwise they vary the initialisation too.
    init = [] if cfg.model.tiny_pretrain_steps else [f"model.tiny_seed={seed}"]
    return [*extra, *steps, f"run.seed={seed}", *init, f"rollout.seed={seed}", f"run.out_dir={out_dir}", *keep]


def shares_stage1(name: str, extra: list[str], base: Path | None = None) -> bool:
    """True for an arm whose config differs from the default's only in keys Stage-1 does not read
    (``coordexp_rl.config.STAGE2_ONLY_KEYS``)."""
    if name == "default":
        return False
    return all(is_stage2_only(k) for k in changed_keys(name, extra, base))


def changed_keys(name: str, extra: list[str], base: Path | None = None) -> list[str]:
    """The dotted keys in which an arm's config differs from the default's (both on ``base``)."""
    return changed_settings(load_config(arm_configs(name, base), extra).model_dump(),
                         load_config(arm_configs("default", base), extra).model_dump())


def stage1_checkpoint(default_run: Path, stage1_steps: int) -> Path:
    return default_run / "checkpoints" / f"step-{stage1_steps:06d}"


def _wait_for(marker: Path, run: Path, poll_s: float = 2.0) -> None:
    """Block until ``marker`` exists (the default run's complete Stage-1 checkpoint, or its results) or the
    default run of this seed is no longer in progress (its ``running`` marker is gone)."""
    while not marker.exists() and (run / "running").exists():
        time.sleep(poll_s)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return out


def _units(record: dict) -> float | None:
    """A step's compute in units (COMPUTE_UNITS); None for a record that logged none (an older run)."""
    if "compute/learner_tokens" not in record:
        return None
    return sum(u * float(record.get(k, 0.0)) for k, u in COMPUTE_UNITS.items())


def stage_costs(run: Path) -> dict[str, float | None]:
    """From a run folder's metrics.jsonl: Stage-2's compute (units, summed over its steps) and wall seconds
    (from the record before its first step to its last step), and one Stage-1 step's mean compute."""
    records = _records(run)
    steps2 = [i for i, r in enumerate(records) if r.get("stage") == "stage2"]
    stage1 = [_units(r) for r in records if r.get("stage") == "stage1"]
    stage2 = [_units(records[i]) for i in steps2]
    wall = records[steps2[-1]]["time"] - records[steps2[0] - 1]["time"] if steps2 and steps2[0] > 0 else None
    return {"stage1_step_units": statistics.fmean(stage1) if stage1 and None not in stage1 else None,
            COSTS[0]: sum(stage2) if stage2 and None not in stage2 else None, COSTS[1]: wall}


def curve_stats(run: Path) -> dict[str, float | None]:
    """Stage-1's learning curve from a run folder's eval rows (initial, eval.every's ``step-N``, stage1):
    the mean object-score AP50 over Stage-1 (trapezoids / steps) and the first evaluated step whose
    class-agnostic F1 reaches AVERAGE_BOX_F1 (None: never). Both None without a curve (no eval.every, or an
    arm that started from the default's Stage-1)."""
    evals = [r for r in _records(run) if r.get("stage") == "eval"]
    end = next((r["step"] for r in evals if r.get("label") == "stage1"), None)  # Stage-2's points stay out
    points = sorted((r["step"], r) for r in evals
                    if r.get("label") in ("initial", "stage1")
                    or (str(r.get("label")).startswith("step-") and (end is None or r["step"] <= end)))
    if len(points) < 3:
        return {CURVE[0]: None, CURVE[1]: None}
    xs, ys = [s for s, _ in points], [r.get("eval/object_prob/AP50") or 0.0 for _, r in points]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    left = next((s for s, r in points if (r.get("eval/f1_class_agnostic") or 0.0) >= AVERAGE_BOX_F1), None)
    return {CURVE[0]: area / (xs[-1] - xs[0]), CURVE[1]: left}


def equal_compute_steps(default_run: Path) -> int | None:
    """Stage-2 SFT steps that cost what the default run's Stage-2 cost (module docstring); None when that
    run's metrics lack the counters."""
    costs = stage_costs(default_run)
    if not costs[COSTS[0]] or not costs["stage1_step_units"]:
        return None
    return max(1, round(costs[COSTS[0]] / costs["stage1_step_units"]))


class StaleRunError(ValueError):
    """A run folder holds results of another config (another --scale or overrides)."""


def _as_run(cfg: Config) -> dict:
    """The config as it runs: Stage-2's rate resolved (stage2.lr set, or derived from optim.lr and equal)."""
    tree = cfg.model_dump()
    tree["stage2"]["lr"] = stage2_lr(cfg)
    tree["run"].pop("overwrite")  # how the folder was claimed, not what ran
    return tree


def check_reusable(out: Path, expected: Config) -> None:
    """Refuse to read back a run whose saved config.yaml differs from what this call would run."""
    saved = out / "config.yaml"
    if saved.exists():
        changed = changed_settings(_as_run(load_config(saved)), _as_run(expected))
        if changed:
            raise StaleRunError(f"{out} holds a run with another config (differs in {', '.join(changed)}); "
                                "pass another --runs-dir or remove that folder")


def run_arm(name: str, seed: int, scale: float, runs_dir: Path, extra: list[str],
            base: Path | None = None) -> dict | None:
    """Run (or read back) one arm; returns the launcher's results (per evaluation label), None on failure."""
    out = runs_dir / name / f"seed{seed}"
    done = out / "results.json"
    default_run = runs_dir / "default" / f"seed{seed}"
    stage2_steps = None
    if name == EQUAL_COMPUTE_ARM:  # its budget is measured on the default run of its seed: wait for all of it
        _wait_for(default_run / "results.json", default_run)
        stage2_steps = equal_compute_steps(default_run)
        if stage2_steps is None:
            print(f"[ablate] {name} seed {seed}: no logged compute in {default_run}/metrics.jsonl (run the default "
                  "arm too); skipped", flush=True)
            return None
    overrides = arm_overrides(name, seed, scale, out, extra, base, stage2_steps)
    if done.exists():
        check_reusable(out, load_config(arm_configs(name, base), overrides))
        return json.loads(done.read_text())
    if shares_stage1(name, extra, base):
        resume = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.resume="))
        _wait_for(Path(resume) / "COMPLETE", default_run)
        if not Path(resume).exists():
            print(f"[ablate] {name} seed {seed}: no Stage-1 checkpoint {resume} (run the default arm too); "
                  "skipped", flush=True)
            return None
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "coordexp_rl.launch"]
    for path in arm_configs(name, base):
        cmd += ["--config", str(path)]
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


def all_arms() -> list[str]:
    return ["default", *sorted(p.stem for p in ABLATIONS.glob("*.yaml"))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="base YAML of every arm, e.g. "
                        "configs/dense_cpu.yaml (the 'default' arm; each arm's YAML is layered over it); default: "
                        "the embedded defaults")
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
    base = Path(args.config).resolve() if getattr(args, "config", None) else None  # launchers run in REPO
    unknown = [a for a in arms if a != "default" and not arm_config(a).exists()]
    if unknown:
        print(f"unknown arms {unknown}; known: {all_arms()}", file=sys.stderr)
        return 2
    if base is not None and not base.exists():
        print(f"--config {args.config}: no such file", file=sys.stderr)
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
    # Arm-major (partial results compare whole arms), the default first: other arms may wait on its runs.
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
            results = list(pool.map(lambda job: run_arm(*job, args.scale, runs_dir, args.overrides, base), jobs))
    except StaleRunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        for m in marked:
            m.unlink(missing_ok=True)
    per_arm: dict[str, list[dict | None]] = {arm: [] for arm in arms}
    for (arm, seed), r in zip(jobs, results):
        costs = stage_costs(runs_dir / arm / f"seed{seed}")
        per_arm[arm].append({**final_metrics(r), **{c: costs[c] for c in COSTS},
                             **curve_stats(runs_dir / arm / f"seed{seed}")} if r else None)
    command = "coordexp-rl ablate " + " ".join(
        [*(["--config", shown(base)] if base else []), *(["--arms", *args.arms] if args.arms else []),
         "--seeds", *map(str, args.seeds), "--scale", f"{args.scale:g}", *args.overrides])
    table = render(per_arm, args.seeds, args.scale, command, base)
    write_results(args.out, table, base)
    print(table)
    print(f"[ablate] table written into {args.out}")
    return 0 if all(r is not None for runs in per_arm.values() for r in runs) else 1
