"""The driver's evaluation: greedy predictions from the rollout actors (their current weights), scored.

Called by ``coordexp_rl.launch`` beside Stage-1 (the initial weights: the actors are idle until the first
sync), after Stage-1 and after Stage-2; writes the folder ``eval/<label>/`` (predictions, metrics.json,
plots, box overlays, report.md). ``Evaluations`` keeps them by label in the run log; ``results_table`` is
the run's report table over them. ``exposure_report`` adds, after Stage-1 and Stage-2, the learner's
teacher-forced box quality on the same images (``exposure.json``; coordexp_rl/evaluation/exposure.py).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Callable

from coordexp_rl.driver.supervisor import predict_all
from coordexp_rl.evaluation.exposure import exposure_metrics, recall_ious
from coordexp_rl.evaluation.metrics import evaluate_paired
from coordexp_rl.evaluation.records import load_jsonl, pair_records
from coordexp_rl.evaluation.report import summary, write_outputs

log = logging.getLogger(__name__)

HEADLINE = [("AP50 (object prob)", "object_prob/AP50"), ("mAP (object prob)", "object_prob/mAP"),
            ("AP50 (constant)", "constant/AP50"), ("AP50 (coord prob)", "coord_prob/AP50"), ("F1@0.5", "f1@0.5/f1"),
            ("mean IoU", "mean_iou"), ("mean IoU (class-agnostic)", "mean_iou_class_agnostic"),
            ("parse failures", "parse_failure_rate")]


def predict_on_actors(actors: list, samples: list, on_gone=lambda: None) -> list[dict]:
    """Prediction records for ``samples``, in order: every actor predicts its every-n-th share; a dead
    actor's share is retried (``coordexp_rl.driver.supervisor.predict_all``; ``on_gone`` runs when one is seen gone)."""
    shards = [samples[i::len(actors)] for i in range(len(actors))]
    by_id = {p["sample_id"]: p for p in predict_all(actors, shards, on_gone=on_gone)}
    return [by_id[s.sample_id] for s in samples]


def evaluate_on_actors(actors: list, samples: list, gt_path: Path, image_root: Path, folder: Path,
                       on_gone=lambda: None) -> dict:
    """Predict ``samples`` (the first of ``gt_path``'s records), score, write ``folder``; the headline metrics.
    ``on_gone``: see ``predict_on_actors``."""
    gts = load_jsonl(gt_path)[: len(samples)]
    preds = predict_on_actors(actors, samples, on_gone)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    gt_records, pred_records = pair_records(gts, preds)
    metrics = evaluate_paired(gt_records, pred_records, score_modes=("constant", "coord_prob", "object_prob"))
    # metrics.json, plots, box overlays of 8 images and report.md: people look rather than read
    write_outputs(metrics, gt_records, pred_records, folder, image_root)
    return summary(metrics)


def exposure_report(teacher_forced: list[list[float]], headline: dict, gt_path: Path, folder: Path,
                    learner_steps_ahead: int = 0) -> dict:
    """The ``exposure/`` keys (coordexp_rl/evaluation/exposure.py) of an evaluation that ``evaluate_on_actors``
    wrote to ``folder`` (its predictions.jsonl, and its ``headline``), with the learner's teacher-forced IoUs
    of the same first images of ``gt_path``; also written, per image too, to ``folder/exposure.json``.
    ``learner_steps_ahead``: optimizer steps the learner's weights (teacher-forced) are past the actors'
    (free-running); 0 when the evaluation follows a sync."""
    preds = load_jsonl(folder / "predictions.jsonl")
    gt_records, pred_records = pair_records(load_jsonl(gt_path)[: len(preds)], preds)
    if len(teacher_forced) != len(gt_records):
        raise ValueError(f"exposure: {len(teacher_forced)} teacher-forced images for {len(gt_records)} evaluated")
    keys = exposure_metrics(teacher_forced, [g.boxes for g in gt_records], [p.boxes for p in pred_records],
                            headline.get("mean_iou_class_agnostic"))
    per_image = [{"image": g.image, "gt_boxes": len(g.boxes), "teacher_forced_iou": tf,
                  "free_running_recall_iou": recall_ious(g.boxes, p.boxes)}
                 for tf, g, p in zip(teacher_forced, gt_records, pred_records)]
    if learner_steps_ahead:
        log.warning("exposure: the teacher-forced weights are %d steps past the actors' (no sync since)",
                    learner_steps_ahead)
    (folder / "exposure.json").write_text(json.dumps(
        {**keys, "learner_steps_ahead": learner_steps_ahead, "notes": EXPOSURE_NOTES, "per_image": per_image},
        indent=1, default=float) + "\n")
    return keys


EXPOSURE_NOTES = {
    "teacher_forced_iou": "per GT box, in canonical order (y1, x1): IoU of the CoordExp box the learner decodes "
                          "on the GT sequence (no grad) with the GT box; every GT box counts",
    "free_running_mean_iou": "the evaluation's mean_iou_class_agnostic: mean over one-to-one matched "
                             "(any overlap) predictions only; misses do not count",
    "free_running_recall_iou": "per GT box, in the GT file's order: the best IoU any greedy prediction of its "
                               "image reaches (0 when none); every GT box counts, as in teacher_forced_mean_iou",
    "gap": "teacher_forced_mean_iou - free_running_recall_iou",
}


INITIAL = "initial"  # the evaluation of the weights a run starts from


def curve_label(step: int) -> str:
    """The label of an evaluation during training (eval.every): ``step-000300``."""
    return f"step-{step:06d}"


class Evaluations:
    """The run's evaluations by label: ``score(label)`` (the headline metrics of the actors' weights) logged
    to the run log as an ``eval`` row. Those kept from before a resume are not redone."""

    def __init__(self, score: Callable[[str], dict], run_log, on_scored: Callable | None = None,
                 eval_dir: Path | None = None):
        """``on_scored(label, step, headline)``: called with each new score (e.g. the best checkpoint's);
        ``eval_dir``: where ``score`` writes each evaluation's outputs (<eval_dir>/<label>/), for the trackers."""
        self.score, self.run_log, self.on_scored, self.eval_dir = score, run_log, on_scored, eval_dir
        self.results: dict[str, dict] = run_log.evaluations()
        self.kept_steps: dict[str, int] = run_log.evaluation_steps()
        self.pending: tuple[threading.Thread, list] | None = None

    def once(self, label: str, step: int, samples: int | None = None) -> None:
        """Score (``samples``: the first N validation samples; None = eval.max_samples) and log at ``step``."""
        kept_at = self.kept_steps.get(label, step)
        if label in self.results and (label == INITIAL or kept_at == step):
            log.info("eval %s: kept from before the resume", label)
            return
        if label in self.results:  # a resumed run with a longer stage: its end moved, the new weights count
            log.info("eval %s: made again at step %d (the one kept from before the resume was at step %d)",
                     label, step, kept_at)
        headline = self.score(label, samples)
        self.run_log.log("eval", step, {"label": label, **{f"eval/{k}": v for k, v in headline.items()}})
        if self.eval_dir is not None:
            self.run_log.evaluation(label, step, headline, self.eval_dir / label)
        log.info("eval %s: %s", label, {k: headline.get(k) for k in ("constant/mAP", "constant/AP50", "f1@0.5/f1",
                                                                     "mean_iou", "parse_failure_rate")})
        self.results[label] = headline
        if self.on_scored:
            self.on_scored(label, step, headline)

    def start(self, label: str, step: int, samples: int | None = None) -> None:
        """``once`` in a thread while the learner trains; ``wait`` (before the weights change) joins it and
        raises its error. Logged as soon as scored, so a run stopped meanwhile keeps it. The initial one is
        skipped past step 0 (a resumed run's actors hold a checkpoint's weights, not the initial ones)."""
        if label == INITIAL and step > 0 and label not in self.results:
            log.info("eval %s: skipped (resumed at step %d, past the initial weights)", label, step)
            return
        errors: list[BaseException] = []

        def body():
            try:
                self.once(label, step, samples)
            except BaseException as exc:  # noqa: BLE001 -- raised in the caller's thread by wait()
                errors.append(exc)

        self.pending = (threading.Thread(target=body, name=f"eval-{label}", daemon=True), errors)
        self.pending[0].start()

    def raise_failure(self) -> None:
        """Raise the error of an evaluation scoring beside training as soon as it has failed (non-blocking):
        a broken evaluation stops the run now, not after the stage it runs beside."""
        if self.pending is not None and not self.pending[0].is_alive() and self.pending[1]:
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        (thread, errors), self.pending = self.pending, None
        thread.join()
        if errors:
            raise errors[0]


def results_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per evaluation label, the HEADLINE columns ("n/a" where missing).

    >>> print(results_table({"initial": {"mean_iou": 0.5}}).splitlines()[2].split(" | ")[6])
    0.5000
    """
    lines = ["| after | " + " | ".join(c for c, _ in HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for label, r in results.items():
        cells = (r.get(k) for _, k in HEADLINE)
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines)
