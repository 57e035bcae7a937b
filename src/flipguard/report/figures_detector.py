"""Detector figures: ROC curve, score histograms with the threshold, example anomaly maps.

>>> fpr, tpr, auc = roc_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
>>> round(auc, 2)
0.75
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from flipguard.report.figures import STYLE, new_figure

__all__ = ["examples_figure", "histogram_figure", "roc_figure", "roc_points"]


def roc_points(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve ``(fpr, tpr, auc)``; NaN scores rank highest (as in ``flipguard.metrics``),
    ties share one point (the area counts them 1/2). Needs both classes (else auc is NaN)."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1).copy()
    s[np.isnan(s)] = np.inf
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tpr = np.r_[0.0, np.cumsum(y)[last] / P]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / N]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


def roc_figure(labels: Any, scores: Any, threshold: float | None = None) -> Any:
    """ROC of image scores; marks the operating point of ``threshold`` (score > threshold)."""
    fpr, tpr, auc = roc_points(labels, scores)
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    with plt.rc_context(STYLE):
        fig, ax = new_figure(4.6, 4.2)
        ax.plot(fpr, tpr, color="#2e86c1", lw=2, label=f"detector (AUROC {auc:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="chance")
        if threshold is not None and y.any() and (~y).any():
            pred = ~np.isfinite(s) | (s > threshold)
            ax.plot([pred[~y].mean()], [pred[y].mean()], "o", color="#c0392b",
                    label=f"threshold {threshold:.4g}")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_title("Image-level ROC")
        ax.legend(loc="lower right")
    return fig


def histogram_figure(labels: Any, scores: Any, threshold: float) -> Any:
    """Histograms of normal and defective image scores with the threshold line
    (non-finite scores are left out and counted in the title)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    lo = min(s[finite].min(), threshold) if finite.any() else threshold - 1
    hi = max(s[finite].max(), threshold) if finite.any() else threshold + 1
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
    with plt.rc_context(STYLE):
        fig, ax = new_figure(6.0, 3.6)
        ax.hist(s[finite & ~y], bins=bins, alpha=0.6, color="#27ae60",
                label=f"normal ({int((~y).sum())})")
        ax.hist(s[finite & y], bins=bins, alpha=0.6, color="#c0392b",
                label=f"defective ({int(y.sum())})")
        ax.axvline(threshold, color="#222222", ls="--", lw=1.5,
                   label=f"threshold {threshold:.4g}")
        ax.set_xlabel("image anomaly score")
        ax.set_ylabel("images")
        bad = int((~finite).sum())
        ax.set_title("Score distributions" + (f" ({bad} non-finite not shown)" if bad else ""))
        ax.legend()
    return fig


def _show(ax: Any, img: np.ndarray, cmap: str | None, title: str = "",
          vmax: float | None = None) -> None:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        ax.imshow(np.clip(a, 0, 1))
    else:
        ax.imshow(np.nan_to_num(a), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)


def examples_figure(images: np.ndarray, maps: np.ndarray, masks: np.ndarray | None,
                    titles: Sequence[str]) -> Any:
    """Columns = example test images; rows = image, anomaly map (shared scale), ground truth."""
    k = len(images)
    rows = 3 if masks is not None else 2
    vmax = float(np.nanmax(maps)) if np.isfinite(maps).any() else 1.0
    with plt.rc_context(STYLE):
        fig, axes = new_figure(1.9 * max(k, 2) + 0.6, 2.0 * rows, rows, max(k, 1),
                               layout=None, squeeze=False)
        fig.subplots_adjust(left=0.07, right=0.99, bottom=0.02, top=0.92, wspace=0.08,
                            hspace=0.12)
        for j in range(k):
            _show(axes[0, j], images[j], "gray", titles[j] if j < len(titles) else "", 1.0)
            _show(axes[1, j], maps[j], "inferno", vmax=vmax or 1.0)
            if masks is not None:
                _show(axes[2, j], masks[j], "gray", vmax=1.0)
        labels = ["image", "anomaly map", "ground truth"][:rows]
        for i, text in enumerate(labels):
            axes[i, 0].set_ylabel(text)
    return fig
