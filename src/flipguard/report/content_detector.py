"""Detector section: metrics, ROC, score histograms with the threshold, example maps."""

from __future__ import annotations

from typing import Any

import numpy as np

from flipguard.report.figures import render
from flipguard.report.figures_detector import (
    examples_figure,
    histogram_figure,
    roc_figure,
    roc_points,
)
from flipguard.report.sections import Column, Note, ReportContext, Section, Table, section

__all__ = ["METRIC_HELP", "detector"]

METRIC_HELP = {
    "image_auroc": "area under the image-level ROC",
    "pixel_auroc": "area under the pixel-level ROC (needs ground-truth masks)",
    "aupro": "area under the per-region-overlap curve up to 30 % FPR (MVTec definition)",
    "threshold": "decision threshold, calibrated on normal validation images",
    "accuracy": "accuracy at the threshold",
    "f1": "F1 at the threshold",
    "precision": "precision at the threshold",
    "recall": "recall at the threshold",
    "tp": "defective images flagged", "fp": "normal images flagged",
    "tn": "normal images passed", "fn": "defective images missed",
    "n_test": "test images", "n_anomalous": "defective test images",
    "oracle_f1": "best F1 over thresholds chosen on the test labels (upper bound only)",
    "oracle_threshold": "threshold of the oracle F1 (not deployable)",
}


def _metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    keys = [k for k in METRIC_HELP if k in metrics]
    keys += [k for k in metrics if k not in METRIC_HELP]
    rows = []
    for k in keys:
        v = metrics[k]
        if isinstance(v, (dict, list)):
            continue
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        rows.append({"metric": k, "value": float(v) if num else v,
                     "meaning": METRIC_HELP.get(k, "")})
    return rows


@section("Detector", order=20)
def detector(ctx: ReportContext) -> Section | None:
    """Metrics table, ROC curve, score histograms and example anomaly maps."""
    d = ctx.detector
    if d is None and not ctx.metrics:
        return None
    blocks: list[Any] = []
    if ctx.metrics:
        blocks.append(Table("detector_metrics",
                            [Column("metric", "metric"), Column("value", "value", "float"),
                             Column("meaning", "meaning")],
                            _metric_rows(ctx.metrics), "Detector metrics (metrics.json)"))
    if d is None:
        blocks.append(Note("The test images could not be loaded, so the detector figures are "
                           "omitted (see the notes in the summary)."))
        return Section("Detector", blocks)
    labels = np.asarray(d.labels).astype(np.int64)
    scores = np.asarray(d.scores, dtype=np.float64)
    fpr, tpr, auc = roc_points(labels, scores)
    blocks.append(render(roc_figure(labels, scores, d.threshold), "detector_roc",
                         f"Image-level ROC curve (AUROC {auc:.4f}); the dot is the operating "
                         "point of the calibrated threshold."))
    blocks.append(Table("detector_roc", [Column("fpr", "false-positive rate", "float"),
                                         Column("tpr", "true-positive rate", "float")],
                        [{"fpr": float(a), "tpr": float(b)} for a, b in zip(fpr, tpr,
                                                                             strict=True)],
                        "ROC curve points", limit=500, collapsed=True))
    blocks.append(render(histogram_figure(labels, scores, d.threshold), "detector_scores",
                         "Image anomaly scores of normal and defective test images; the dashed "
                         "line is the decision threshold."))
    types = d.types if len(d.types) == len(scores) else ["" for _ in scores]
    srows = [{"image": i, "type": t, "label": int(y), "score": float(s),
              "anomalous": bool(not np.isfinite(s) or s > d.threshold)}
             for i, (t, y, s) in enumerate(zip(types, labels, scores, strict=True))]
    blocks.append(Table("detector_scores",
                        [Column("image", "test image", "int"), Column("type", "type"),
                         Column("label", "label (1 = defective)", "int"),
                         Column("score", "score", "float"),
                         Column("anomalous", "flagged anomalous")],
                        srows, "Image scores and decisions", limit=500, collapsed=True))
    if d.images is not None and d.maps is not None and len(d.images):
        blocks.append(render(examples_figure(d.images, d.maps, d.masks, d.titles),
                             "detector_examples",
                             "Example test images (top), their anomaly maps (middle, one "
                             "colour scale) and ground-truth defect masks (bottom)."))
    return Section("Detector", blocks)
