"""faster-coco-eval against pycocotools (the reference) on the same COCO inputs, to 1e-6."""

import random

import pytest

from coordexp_rl.evaluation.coco import build_coco_inputs, run_cocoeval
from coordexp_rl.evaluation.records import pair_records
from tests.evaluation.builders import gt_rec, pred_rec

NAMES = ["cat", "dog", "red car", "person", "tree"]


def random_case(seed: int) -> tuple[list[dict], list[dict]]:
    """Jittered copies of GT boxes (some with a wrong or unknown desc, some missing), plus random FPs."""
    rng = random.Random(seed)
    gts, preds = [], []
    for i in range(rng.randint(3, 12)):
        w, h = rng.choice([(640, 480), (320, 320), (100, 200)])
        objs = []
        for _ in range(rng.randint(0, 8)):
            x, y = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            objs.append((rng.choice(NAMES), [x, y, x + rng.uniform(4, w * 0.3), y + rng.uniform(4, h * 0.3)]))
        dets = []
        for desc, (x1, y1, x2, y2) in objs:
            if rng.random() < 0.2:
                continue
            j = rng.uniform(0, 0.25) * (x2 - x1)
            d = desc if rng.random() < 0.8 else rng.choice(NAMES + ["zebra"])
            # Quantised scores make ties common, which exercises the stable-sort order.
            dets.append((d, [x1 + j, y1 - j, x2 + j, y2], round(rng.random(), 1)))
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
            dets.append((rng.choice(NAMES + ["bicycle"]), [x, y, x + 20, y + 30], round(rng.random(), 1)))
        rng.shuffle(dets)
        gts.append(gt_rec(f"{i}.png", objs, w, h))
        preds.append(pred_rec(f"{i}.png", dets, "ok", w, h))
    return gts, preds


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["constant", "coord_prob"])
def test_faster_coco_eval_equals_pycocotools(seed, mode):
    inputs = build_coco_inputs(*pair_records(*random_case(seed)), mode)
    assert inputs.dets and inputs.gt["annotations"]
    fast, ref = run_cocoeval(inputs, "faster"), run_cocoeval(inputs, "pycocotools")
    for key in ("mAP", "AP50", "AP75", "AR100"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-6), key
    assert fast["per_category"].keys() == ref["per_category"].keys()
    for name, r in ref["per_category"].items():
        for key, value in r.items():
            if value is None:
                assert fast["per_category"][name][key] is None
            else:
                assert fast["per_category"][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_random_cases_are_not_trivial():
    # Guard for the cross-check: the cases must give AP values strictly between 0 and 1.
    values = [run_cocoeval(build_coco_inputs(*pair_records(*random_case(s)), "coord_prob"))["mAP"] for s in range(8)]
    assert all(0.0 < v < 1.0 for v in values), values
    assert len({round(v, 6) for v in values}) > 4
