"""Metrics against scikit-learn, hand-computed PRO curves and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from flipguard.errors import FlipguardError
from flipguard.metrics import (
    MetricError,
    aupro,
    best_f1_threshold,
    image_auroc,
    pixel_auroc,
    pro_curve,
    threshold_metrics,
    trapezoid,
)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=40) + y, 1)  # rounding creates ties
        assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert image_auroc(torch.tensor([0, 1, 1]), torch.tensor([0.3, 0.2, 0.9])) == 0.5


def test_image_auroc_nan_ranked_like_inf():
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    s = np.array([0.1, np.nan, 0.5, np.inf, 0.2, -np.inf, -np.inf])
    ref = roc_auc_score(y, [0.1, 1e9, 0.5, 1e9, 0.2, -1e9, -1e9])
    assert image_auroc(y, s) == pytest.approx(ref)


def test_auroc_single_class_is_a_clear_error():
    with pytest.raises(MetricError, match="both normal and anomalous"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(FlipguardError, match="pixel_auroc"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.rand(2, 4, 4))


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 1, 8, 8)) > 0.8).astype(np.float32)
    maps = rng.random((3, 1, 8, 8)).astype(np.float32) + masks * 0.3
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(ref)


def _hand_case():
    """Image 0: defect regions R1 = {(0,0),(1,1)} (one region under 8-connectivity) and
    R2 = {(3,3)}; image 1 is all normal. 2 regions, 29 normal pixels."""
    masks = np.zeros((2, 4, 4), dtype=np.float32)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0] = 0.1
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3], maps[0, 0, 1] = 0.9, 0.5, 0.7, 0.8
    maps[1, 2, 2], maps[1, 0, 3] = 0.6, 0.5  # 0.5 ties with the defect pixel (1,1)
    return masks, maps


def test_pro_curve_hand_computed():
    masks, maps = _hand_case()
    fprs, pros = pro_curve(masks, maps)
    # thresholds 0.9, 0.8, 0.7, 0.6, 0.5 (tie group), 0.1, 0.0; R1 pixel weighs 1/(2*2),
    # the R2 pixel 1/(1*2).
    exp_f = np.array([0, 0, 1, 1, 2, 3, 15, 29, 29]) / 29
    exp_p = np.array([0, 0.25, 0.25, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(fprs, exp_f, rtol=0, atol=1e-15)
    np.testing.assert_allclose(pros, exp_p, rtol=0, atol=1e-15)


def test_aupro_hand_computed():
    masks, maps = _hand_case()
    # area up to 0.3: (0.25 + 0.75 + 0.875) / 29 + (0.3 - 3/29) * 1, then / 0.3
    expected = (1.875 / 29 + 0.3 - 3 / 29) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert aupro(masks[:, None], maps[:, None]) == pytest.approx(expected, abs=1e-12)
    # Full range: add the rest of the curve (pro = 1 from 3/29 to 1).
    full = 1.875 / 29 + (1 - 3 / 29)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(full, abs=1e-12)


def test_aupro_perfect_and_inverted():
    masks, _ = _hand_case()
    assert aupro(masks, masks) == pytest.approx(1.0)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Direct definition: for each distinct threshold t, PRO(t) = mean over all 8-connected
    regions of the fraction of region pixels with score >= t, FPR(t) = fraction of normal
    pixels with score >= t; area by np.trapezoid with an interpolated endpoint at ``limit``."""
    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i] > 0, structure=np.ones((3, 3)))
        regions += [maps[i][lab == k] for k in range(1, n + 1)]
    normal = maps[masks == 0]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    xs, ys = np.array(xs), np.array(ys)
    y_lim = np.interp(limit, xs, ys)  # xs is non-decreasing
    keep = xs <= limit
    return float(np.trapezoid(np.append(ys[keep], y_lim), np.append(xs[keep], limit)) / limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 12), dtype=np.float32)
    for i in range(3):  # image 3 stays defect-free
        for _ in range(2):
            r, c = rng.integers(0, 10, 2)
            masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 1
    maps = np.round(rng.random(masks.shape) * 0.6 + masks * 0.4, 2).astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(_reference_aupro(masks, maps, 0.3), abs=1e-9)
    assert aupro(masks, maps, 0.05) == pytest.approx(
        _reference_aupro(masks, maps, 0.05), abs=1e-9
    )


def test_aupro_errors():
    with pytest.raises(MetricError, match="defect regions"):
        aupro(np.zeros((1, 4, 4)), np.random.rand(1, 4, 4))
    with pytest.raises(MetricError, match="finite"):
        aupro(np.eye(4)[None], np.full((1, 4, 4), np.nan))
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(np.eye(4)[None], np.random.rand(1, 4, 4), fpr_limit=0)


def test_trapezoid_interpolates_at_x_max():
    x, y = np.array([0.0, 0.2, 0.6, 1.0]), np.array([0.0, 0.4, 0.8, 1.0])
    # up to 0.3: 0.5*0.4*0.2 + 0.5*(0.4 + 0.5)*0.1
    assert trapezoid(x, y, x_max=0.3) == pytest.approx(0.04 + 0.045)
    assert trapezoid(x, y) == pytest.approx(np.trapezoid(y, x))


def test_threshold_metrics_against_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    s = rng.random(50) + 0.3 * y
    res = threshold_metrics(y, s, 0.6)
    pred = (s > 0.6).astype(int)
    assert res["f1"] == pytest.approx(f1_score(y, pred))
    assert res["precision"] == pytest.approx(precision_score(y, pred))
    assert res["recall"] == pytest.approx(recall_score(y, pred))
    assert res["accuracy"] == pytest.approx(np.mean(pred == y))
    assert res["tp"] + res["fp"] + res["tn"] + res["fn"] == 50
    assert res["tp"] == int(((pred == 1) & (y == 1)).sum())


def test_threshold_metrics_strict_inequality_and_non_finite():
    res = threshold_metrics([0, 0, 1, 1], [0.5, np.nan, 0.5, np.inf], 0.5)
    # 0.5 is not > 0.5 -> normal; NaN and Inf -> anomalous
    assert (res["tp"], res["fp"], res["tn"], res["fn"]) == (1, 1, 1, 1)
    none = threshold_metrics([0, 0], [0.1, 0.2], 0.5)
    assert none["precision"] == 0.0 and none["f1"] == 0.0 and none["accuracy"] == 1.0


def test_best_f1_threshold_is_brute_force_optimum():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 30)
    s = np.round(rng.random(30) + 0.4 * y, 1)
    f1, thr = best_f1_threshold(y, s)
    cands = np.concatenate(([s.min() - 1], np.unique(s)))
    brute = max(f1_score(y, (s > t).astype(int)) for t in cands)
    assert f1 == pytest.approx(brute)
    assert threshold_metrics(y, s, thr)["f1"] == pytest.approx(f1)
    assert best_f1_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == (1.0, 0.2)
