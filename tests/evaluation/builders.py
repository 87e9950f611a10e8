"""Small builders for GT / prediction records in the JSONL shapes the evaluator reads."""

from __future__ import annotations


def gt_rec(image: str, objects: list[tuple[str, list[float]]], width: int = 100, height: int = 100) -> dict:
    return {"images": [image], "width": width, "height": height,
            "objects": [{"desc": d, "bbox_2d": list(b)} for d, b in objects]}


def pred_rec(image: str, objects: list[tuple[str, list[float], float]], status: str = "ok",
             width: int = 100, height: int = 100, reasons: dict | None = None) -> dict:
    return {"images": [image], "width": width, "height": height, "parse_status": status,
            "parse_reasons": reasons or {},
            "objects": [{"desc": d, "bbox_2d": list(b), "score": s} for d, b, s in objects]}


def two_images_gt() -> list[dict]:
    """Image a: a cat and a dog; image b: one cat."""
    return [gt_rec("a.png", [("cat", [10, 10, 50, 50]), ("dog", [60, 60, 90, 90])]),
            gt_rec("b.png", [("cat", [20, 20, 70, 80])])]


def perfect_preds(gt: list[dict], score: float = 0.9) -> list[dict]:
    return [pred_rec(g["images"][0], [(o["desc"], o["bbox_2d"], score) for o in g["objects"]]) for g in gt]
