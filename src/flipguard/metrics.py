"""Anomaly-detection metrics: image/pixel AUROC, AU-PRO (official MVTec AD definition) and
metrics at a fixed threshold.

Conventions:
    * Labels/masks: 1 (or True) = anomalous, 0 = normal. Scores: higher = more anomalous.
    * Non-finite scores (NaN, +-Inf, e.g. from a faulty network) count as anomalous in
      ``threshold_metrics``. The AUROCs rank NaN like +Inf (above every finite score, ties
      among themselves) and keep -Inf as the lowest possible score (numeric order).
    * AUROCs need both classes; otherwise :class:`MetricError` is raised.
"""

from __future__ import annotations

from bisect import bisect
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from flipguard.errors import FlipguardError

__all__ = [
    "MetricError",
    "image_auroc",
    "auroc_se",
    "pixel_auroc",
    "pro_curve",
    "trapezoid",
    "aupro",
    "threshold_metrics",
    "best_f1_threshold",
]

ArrayLike = Any  # np.ndarray | torch.Tensor | sequence


class MetricError(FlipguardError, ValueError):
    """A metric cannot be computed from the given labels/scores (one line)."""


def _np(a: ArrayLike, dtype: Any = None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def _nan_high(scores: np.ndarray) -> np.ndarray:
    """Replace NaN scores by +inf (ranked above every finite score)."""
    s = scores.astype(np.float64, copy=True)
    s[np.isnan(s)] = np.inf
    return s


def _auroc(labels: np.ndarray, scores: np.ndarray, what: str) -> float:
    labels = labels.reshape(-1).astype(bool)
    scores = _nan_high(scores.reshape(-1))
    if labels.shape != scores.shape:
        raise MetricError(f"{what}: expected labels and scores of equal size "
                          f"(got {labels.size} and {scores.size})")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"{what}: expected both normal and anomalous samples "
                          f"(got {n_pos} anomalous, {n_neg} normal)")
    # Mann-Whitney U with ties counted 1/2 (== sklearn's roc_auc_score): sort the larger
    # class (fast SIMD sort) and binary-search the smaller one; no full-length rank array.
    pos, neg = scores[labels], scores[~labels]
    if pos.size <= neg.size:
        ref = np.sort(neg)
        lo, hi = np.searchsorted(ref, pos, "left"), np.searchsorted(ref, pos, "right")
        u = float(np.sum(lo, dtype=np.int64)) + 0.5 * float(np.sum(hi - lo, dtype=np.int64))
    else:
        ref = np.sort(pos)
        lo, hi = np.searchsorted(ref, neg, "left"), np.searchsorted(ref, neg, "right")
        u = float(np.sum(ref.size - hi, dtype=np.int64))
        u += 0.5 * float(np.sum(hi - lo, dtype=np.int64))
    return u / (n_pos * n_neg)


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores (Mann-Whitney U; equals scikit-learn's
    ``roc_auc_score``). Raises :class:`MetricError` when only one class is present.

    Example:
        >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    return _auroc(_np(labels), _np(scores, np.float64), "image_auroc")


def auroc_se(labels: ArrayLike, scores: ArrayLike) -> float:
    """Standard error of the image AUROC of ``scores`` (DeLong et al., Biometrics 1988:
    from the per-image structural components, ties counted one half).

    Example:
        >>> round(auroc_se([0, 0, 0, 1, 1, 1], [0.1, 0.3, 0.5, 0.4, 0.6, 0.9]), 4)
        0.1571
    """
    y, s = _np(labels).astype(bool), _np(scores, np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) < 2 or len(neg) < 2:
        raise MetricError(f"auroc_se: expected at least 2 images of both classes (got "
                          f"{len(pos)} anomalous, {len(neg)} normal)")
    cmp = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = cmp.mean(axis=1), cmp.mean(axis=0)
    return float(np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)))


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """AUROC over all pixels of all images; ``masks`` and ``maps`` have equal shape
    (e.g. (N, 1, H, W)), masks in {0, 1}.

    Example:
        >>> pixel_auroc(np.array([[0, 1], [0, 0]]), np.array([[0.1, 0.9], [0.2, 0.3]]))
        1.0
    """
    m, s = _np(masks), _np(maps, np.float64)
    if m.shape != s.shape:
        raise MetricError(f"pixel_auroc: expected masks and maps of equal shape "
                          f"(got {m.shape} and {s.shape})")
    return _auroc(m > 0.5, s, "pixel_auroc")


def _as_images(a: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise MetricError(f"{what}: expected (N, H, W) or (N, 1, H, W) (got shape {a.shape})")
    return a


def pro_curve(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO curves exactly as MVTec's ``pro_curve_util.compute_pro``.

    Each 8-connected ground-truth region is weighted equally: a defect pixel contributes
    1 / (region size * number of regions). FPR runs over all normal pixels of all images.
    Scores are sorted descending and only the last point of each run of equal scores is kept;
    (0, 0) and (1, 1) are prepended/appended. Returns ``(fprs, pros)`` (float64).
    """
    gt = _as_images(_np(masks), "aupro masks") > 0.5
    scores = _as_images(_np(maps), "aupro maps")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if gt.shape != scores.shape:
        raise MetricError(f"aupro: expected masks and maps of equal shape "
                          f"(got {gt.shape} and {scores.shape})")
    if not np.isfinite(scores).all():
        raise MetricError("aupro maps: expected finite anomaly maps (got NaN/Inf)")
    structure = np.ones((3, 3), dtype=int)
    pro_w = np.zeros(gt.shape, dtype=np.float64)
    n_regions = 0
    for i in range(gt.shape[0]):
        if not gt[i].any():
            continue
        lab, n = ndimage.label(gt[i], structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        inv = np.zeros(n + 1)
        inv[1:] = 1.0 / sizes[1:]
        pro_w[i] = inv[lab]
        n_regions += n
    n_ok = int((~gt).sum())
    if n_regions == 0 or n_ok == 0:
        raise MetricError(f"aupro: expected both defect and normal pixels in the masks "
                          f"(got {n_regions} defect regions, {n_ok} normal pixels)")
    # Sort descending; within runs of equal scores the order is irrelevant because only the
    # last point of each run is kept. Arrays are freed early (~30 bytes per pixel at peak).
    order = np.argsort(scores.ravel())[::-1]
    s_sorted = scores.ravel()[order]
    keep = np.append(s_sorted[1:] != s_sorted[:-1], True)
    del s_sorted
    fps = np.cumsum((~gt).ravel()[order], dtype=np.int64)[keep]
    pw = pro_w.ravel()[order]
    del order, pro_w
    np.cumsum(pw, out=pw)
    fprs = np.clip(fps / float(n_ok), None, 1.0)
    pros = np.clip(pw[keep] / n_regions, None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Trapezoidal area under ``y(x)`` (x ascending) up to ``x_max`` with linear interpolation
    at ``x_max``, as MVTec's ``generic_util.trapezoid`` (non-finite points are dropped).

    Example:
        >>> trapezoid(np.array([0.0, 1.0]), np.array([0.0, 1.0]), x_max=0.5)
        0.125
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            if not 0 < ins < len(x):
                raise MetricError(f"trapezoid: x_max={x_max} outside the curve's x range")
            dx = x[ins] - x[ins - 1]
            y_int = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / dx
            correction = 0.5 * (y_int + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD definition):
    ``trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit``, in [0, 1].

    Memory: about 30 bytes per pixel (700 x 128 x 128 -> ~350 MB peak).

    Example:
        >>> m = np.zeros((1, 4, 4)); m[0, :2, :2] = 1
        >>> aupro(m, m + 0.0)
        1.0
    """
    if not 0 < fpr_limit <= 1:
        raise MetricError(f"aupro fpr_limit: expected 0 < fpr_limit <= 1 (got {fpr_limit})")
    fprs, pros = pro_curve(masks, maps)
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, Any]:
    """Confusion counts and F1/precision/recall/accuracy for ``score > threshold`` =>
    anomalous. Non-finite scores are predicted anomalous. Undefined ratios (0/0) are 0.0.

    Example:
        >>> threshold_metrics([0, 1, 1], [0.2, 0.9, float("nan")], 0.5)["recall"]
        1.0
    """
    y = _np(labels).reshape(-1).astype(bool)
    s = _np(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise MetricError(f"threshold_metrics: expected labels and scores of equal size "
                          f"(got {y.size} and {s.size})")
    with np.errstate(invalid="ignore"):
        pred = ~np.isfinite(s) | (s > threshold)
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "accuracy": (tp + tn) / y.size if y.size else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """ORACLE: the threshold maximising F1 on these very labels -> ``(f1, threshold)``.

    Candidates are the distinct finite scores (``score > candidate``) plus one just below the
    minimum (everything anomalous); ties keep the highest threshold. Uses test labels, so it
    is an upper bound, never a deployable threshold.

    Example:
        >>> best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
        (1.0, 0.2)
    """
    y = _np(labels).reshape(-1).astype(bool)
    s = _np(scores, np.float64).reshape(-1)
    finite = s[np.isfinite(s)]
    if finite.size == 0:
        return threshold_metrics(y, s, 0.0)["f1"], float("nan")
    cand = np.unique(finite)
    cand = np.concatenate(([np.nextafter(cand[0], -np.inf)], cand))
    sf = np.where(np.isfinite(s), s, np.inf)
    # counts of scores > t, split by class, for every candidate t (vectorised).
    pos_sorted, neg_sorted = np.sort(sf[y]), np.sort(sf[~y])
    tp = pos_sorted.size - np.searchsorted(pos_sorted, cand, side="right")
    fp = neg_sorted.size - np.searchsorted(neg_sorted, cand, side="right")
    fn = pos_sorted.size - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    best = np.flatnonzero(f1 == f1.max())[-1]
    return float(f1[best]), float(cand[best])
