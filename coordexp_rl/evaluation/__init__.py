"""Detection evaluation: COCO box AP (faster-coco-eval), F1 at IoU 0.5, IoU statistics, reports, plots.

Entry points: ``evaluate(gt_records, pred_records)`` (metrics.py), ``quantisation_boundary_report``
(robustness.py), ``plot_training_curves`` (plots.py, imports matplotlib), and ``coordexp-rl eval`` (cli.py).
"""
