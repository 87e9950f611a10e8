import json
from pathlib import Path

import pytest
from PIL import Image

from coordexp_rl.cli import main
from coordexp_rl.evaluation.plots import plot_training_curves
from coordexp_rl.evaluation.robustness import near_bin_edge, quantisation_boundary_report
from tests.evaluation.builders import gt_rec, pred_rec


@pytest.fixture
def drawn(monkeypatch):
    """What each saved figure shows: file name -> {line or bar-group label: its (x, y) points or bar sizes}."""
    from coordexp_rl.evaluation import plots

    shown: dict[str, dict] = {}
    real_save = plots._save

    def spy(fig, path):
        ax = fig.axes[0]
        content = {line.get_label(): [tuple(xy) for xy in line.get_xydata().tolist()] for line in ax.lines}
        for bars in ax.containers:  # bar heights (ax.bar) or widths (ax.barh): the values drawn
            content[bars.get_label()] = [float(v) for v in bars.datavalues]
        shown[Path(path).name] = content
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return shown


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def eval_files(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (120, 80), (200, 200, 255)).save(tmp_path / "imgs" / "a.png")  # b.png is missing on disk
    gt = [gt_rec("imgs/a.png", [("cat", [10, 10, 60, 50]), ("dog", [70, 20, 110, 70])], 120, 80),
          gt_rec("imgs/b.png", [("cat", [0, 0, 40, 40])], 120, 80)]
    pred = [pred_rec("imgs/a.png", [("cat", [12, 10, 60, 50], 0.8), ("bird", [70, 20, 110, 70], 0.6)], "ok", 120, 80),
            pred_rec("imgs/b.png", [], "failed", 120, 80, {"no_box": 1})]
    return _write_jsonl(tmp_path / "gt.jsonl", gt), _write_jsonl(tmp_path / "pred.jsonl", pred), tmp_path


def test_eval_command_prints_summary_and_writes_outputs(eval_files, capsys, drawn):
    gt, pred, tmp = eval_files
    out = tmp / "out"
    assert main(["eval", "--gt", str(gt), "--pred", str(pred), "--out", str(out), "--overlays", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 2 and summary["parse_failure_rate"] == 0.5
    assert summary["f1@0.5/precision"] == 0.5 and summary["f1@0.5/recall"] == pytest.approx(1 / 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unmatched_desc"]["top"] == [["bird", 1]]
    assert metrics["quantisation_boundary"]["near"]["pairs"] + metrics["quantisation_boundary"]["far"]["pairs"] == 1
    # The plots show these numbers: 1 matched pair (the cat, IoU 48 x 40 / (50 x 40) = 0.96) in
    # the 0.9-1.0 bin; per GT description GT / predicted / TP: cat 2 / 1 / 1, dog 1 / 0 / 0 (the bird is no GT
    # description: it is counted under unmatched_desc).
    assert metrics["iou_histogram"]["counts"] == [0] * 9 + [1]
    (bars,) = [v for k, v in drawn["iou_histogram.png"].items() if k != "F1 IoU threshold"]  # the one bar group
    assert bars == [0] * 9 + [1]
    bars = drawn["per_description.png"]
    assert (bars["GT"], bars["PRED"], bars["TP"]) == ([2, 1], [1, 0], [1, 0])
    assert all((out / name).is_file() for name in ("iou_histogram.png", "per_description.png"))
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 2  # 5 asked, 2 images exist in the GT
    # Small images are upscaled (min side 480) so labels stay readable; a missing file gets a canvas.
    assert Image.open(overlays[0]).size == (720, 480) and Image.open(overlays[1]).size == (720, 480)
    report = (out / "report.md").read_text()
    assert "| constant |" in report and "overlays/000_a.png" in report


def test_eval_command_reports_a_missing_prediction_line(eval_files, capsys):
    gt, _, tmp = eval_files
    pred = _write_jsonl(tmp / "short.jsonl", [pred_rec("imgs/a.png", [], "ok", 120, 80)])
    assert main(["eval", "--gt", str(gt), "--pred", str(pred)]) == 1
    assert "'imgs/b.png'" in capsys.readouterr().err


def test_training_curves_one_png_per_group(tmp_path, drawn):
    lines = [{"step": s, "stage": "stage1", "loss/total": 2.0 / s, "loss/ce": 1.5 / s, "match/mean_iou": 0.1 * s}
             for s in range(1, 6)]
    lines += [{"step": 5, "stage": "eval", "eval/mAP": 0.1, "eval/AP50": 0.3, "eval/mean_iou": 0.5, "note": "x"},
              {"step": 10, "stage": "eval", "eval/mAP": 0.2, "eval/AP50": 0.4, "eval/mean_iou": 0.6}]
    path = _write_jsonl(tmp_path / "metrics.jsonl", lines)
    written = plot_training_curves(path, tmp_path / "curves")
    assert sorted(p.name for p in written) == ["curves_losses.png", "curves_map.png", "curves_mean_iou.png"]
    # a line per (metric, stage) with every point of it; "note" (a string) is no metric
    assert drawn["curves_losses.png"] == {"loss/total [stage1]": [(s, 2.0 / s) for s in range(1, 6)],
                                          "loss/ce [stage1]": [(s, 1.5 / s) for s in range(1, 6)]}
    assert drawn["curves_mean_iou.png"] == {"match/mean_iou [stage1]": [(s, 0.1 * s) for s in range(1, 6)],
                                            "eval/mean_iou [eval]": [(5, 0.5), (10, 0.6)]}
    assert drawn["curves_map.png"] == {"eval/AP50 [eval]": [(5, 0.3), (10, 0.4)],
                                       "eval/mAP [eval]": [(5, 0.1), (10, 0.2)]}


def test_near_bin_edge_uses_half_bin_boundaries():
    # Bin 100 covers [0.0995, 0.1005): 0.0995 and 0.1005 are edges, 0.1 is its centre.
    # In bin units: 100.45 is 0.05 from the edge 100.5 (near), 100.35 is 0.15 away (far).
    assert near_bin_edge(0.0995) and near_bin_edge(0.1005) and not near_bin_edge(0.1)
    assert near_bin_edge(0.10045) and near_bin_edge(0.10055) and not near_bin_edge(0.10035)
    assert near_bin_edge(0.10035, margin=0.2)


def test_quantisation_boundary_report_splits_pairs(tmp_path):
    # Image 1000x1000 so pixels = 1000 * c: x1 = 100.5 is an edge; 100.0 is a bin centre.
    gt = [gt_rec("a.png", [("cat", [100.5, 200, 300, 400]), ("dog", [100, 200, 300, 400])], 1000, 1000)]
    pred = [pred_rec("a.png", [("cat", [100, 200, 300, 400], 0.9), ("dog", [100, 200, 300, 400], 0.9)],
                     "ok", 1000, 1000)]
    r = quantisation_boundary_report(gt, pred)
    assert r["near"]["pairs"] == 1 and r["far"]["pairs"] == 1
    assert r["far"]["mean_iou"] == 1.0 and r["near"]["mean_iou"] == pytest.approx(199.5 * 200 / (200 * 200))


@pytest.mark.parametrize("thr", ["2", "nan", "-1", "0", "x"])
def test_an_iou_threshold_outside_0_1_is_refused(eval_files, thr, capsys):
    gt, pred, _ = eval_files
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--gt", str(gt), "--pred", str(pred), "--iou-thr", thr])
    assert exit_info.value.code == 2 and "--iou-thr" in capsys.readouterr().err
