"""Exposure bias: box quality teacher-forced on the GT prefix vs free-running, on the same images.

Teacher-forced: the learner runs one no-grad forward on each image's GT sequence (canonical order) and
decodes every GT box's 4 coordinates with CoordExp at the GT's coord positions (``Learner.
teacher_forced_ious``): each box is predicted with the GT objects before it as context, so every GT box
gets exactly one box, and its IoU with the GT box says how well the model localises when its context is
right. Free-running: the greedy predictions of the evaluation, whose context is the model's own output.

The numbers (``exposure_metrics``):

- ``teacher_forced_mean_iou``: mean over GT boxes of the teacher-forced box's IoU with it;
- ``free_running_mean_iou``: the evaluation's ``mean_iou_class_agnostic`` (metrics.py): per image, a
  one-to-one Hungarian matching of predictions to GT over any overlap (IoU > 0), descriptions ignored,
  mean over the MATCHED pairs only: a missed GT box or a prediction overlapping nothing does not count,
  so it is not box-for-box comparable with the teacher-forced mean;
- ``free_running_recall_iou``: mean over GT boxes of the best IoU any prediction of its image reaches
  with it (0 when none does; not one-to-one): every GT box counts, as in the teacher-forced mean;
- ``gap`` = teacher_forced_mean_iou - free_running_recall_iou: how much box quality the model loses when
  it runs on its own context (misses included) instead of the GT's.

IoU is invariant under scaling each axis, so unit boxes (CoordExp) and pixel boxes (records) compare alike.

    >>> teacher_forced_box_ious([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.25])
    [0.5]
    >>> recall_ious([(0, 0, 10, 10), (20, 20, 30, 30)], [(0, 0, 10, 5), (0, 0, 10, 10)])
    [1.0, 0.0]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from coordexp_rl.evaluation.greedy_match import Box, iou_matrix

PREFIX = "exposure/"


def paired_ious(boxes: Sequence[Box], targets: Sequence[Box]) -> list[float]:
    """IoU of ``boxes[i]`` with ``targets[i]`` (x1 y1 x2 y2); an inverted or empty box has IoU 0."""
    if len(boxes) != len(targets):
        raise ValueError(f"{len(boxes)} boxes for {len(targets)} targets")
    return [float(iou_matrix([b], [t])[0, 0]) for b, t in zip(boxes, targets)]


def teacher_forced_box_ious(coords: Sequence[float], targets: Sequence[float]) -> list[float]:
    """Flat coordinates, 4 per box in x1 y1 x2 y2 order (the GT sequence's coord positions): one IoU per box."""
    if len(coords) != len(targets) or len(coords) % 4:
        raise ValueError(f"need 4 coordinates per box and as many targets: {len(coords)} and {len(targets)}")
    boxes = [tuple(coords[i:i + 4]) for i in range(0, len(coords), 4)]
    return paired_ious(boxes, [tuple(targets[i:i + 4]) for i in range(0, len(targets), 4)])


def recall_ious(gt_boxes: Sequence[Box], pred_boxes: Sequence[Box]) -> list[float]:
    """Per GT box, the best IoU any of ``pred_boxes`` reaches with it (0.0 when there is none)."""
    if not gt_boxes:
        return []
    if not pred_boxes:
        return [0.0] * len(gt_boxes)
    return iou_matrix(pred_boxes, gt_boxes).max(axis=0).tolist()


def exposure_metrics(teacher_forced: Sequence[Sequence[float]], gt_boxes: Sequence[Sequence[Box]],
                     pred_boxes: Sequence[Sequence[Box]], free_running_mean_iou: float | None) -> dict:
    """The ``exposure/`` keys of one evaluation (module docstring), from the same images in the same order:
    ``teacher_forced[i]`` the teacher-forced IoUs of image i's GT boxes, ``gt_boxes[i]`` / ``pred_boxes[i]``
    its GT and free-running boxes, ``free_running_mean_iou`` the evaluation's ``mean_iou_class_agnostic``.
    A mean over no box is None (and so is the gap)."""
    if not len(teacher_forced) == len(gt_boxes) == len(pred_boxes):
        raise ValueError(f"images differ: {len(teacher_forced)} teacher-forced, {len(gt_boxes)} GT, "
                         f"{len(pred_boxes)} predicted")
    for i, (tf, gts) in enumerate(zip(teacher_forced, gt_boxes)):
        if len(tf) != len(gts):
            raise ValueError(f"image {i}: {len(tf)} teacher-forced boxes for {len(gts)} GT boxes")
    tf = _mean([v for ious in teacher_forced for v in ious])
    recall = _mean([v for gts, preds in zip(gt_boxes, pred_boxes) for v in recall_ious(gts, preds)])
    return {f"{PREFIX}teacher_forced_mean_iou": tf, f"{PREFIX}free_running_mean_iou": free_running_mean_iou,
            f"{PREFIX}free_running_recall_iou": recall,
            f"{PREFIX}gap": None if tf is None or recall is None else tf - recall}


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
