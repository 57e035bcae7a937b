"""SSIM, scorer, threshold calibration and evaluation against NumPy/SciPy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from torch import nn

from flipguard.detect import (
    ScoreConfig,
    Scorer,
    calibrate_threshold,
    evaluate_detector,
    fit_map_stats,
    reconstruct,
)
from flipguard.errors import ConfigError, FlipguardError
from flipguard.metrics import aupro, auroc_se, threshold_metrics
from flipguard.ssim import gaussian_blur, gms_map, msgms_map, ssim, ssim_map


def _np_gauss(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _np_filter(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    out = ndimage.correlate1d(img, k, axis=0, mode="nearest")
    return ndimage.correlate1d(out, k, axis=1, mode="nearest")


def _np_ssim_map(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> np.ndarray:
    """Straightforward SSIM (Wang et al. 2004) of (C, H, W) arrays, mean over channels."""
    k = _np_gauss(size, sigma)
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for a, b in zip(x, y, strict=True):
        mu_a, mu_b = _np_filter(a, k), _np_filter(b, k)
        va = _np_filter(a * a, k) - mu_a**2
        vb = _np_filter(b * b, k) - mu_b**2
        cov = _np_filter(a * b, k) - mu_a * mu_b
        out.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                   / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2)))
    return np.mean(out, axis=0)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 3, 20, 12), (1, 1, 5, 7)])
def test_ssim_map_matches_numpy_reference(shape):
    rng = np.random.default_rng(0)
    x = rng.random(shape)
    y = np.clip(x + rng.normal(0, 0.2, shape), 0, 1)
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y))
    assert got.shape == (shape[0], 1, *shape[2:])
    for i in range(shape[0]):
        np.testing.assert_allclose(got[i, 0].numpy(), _np_ssim_map(x[i], y[i]), atol=1e-10)
    f32 = ssim_map(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    np.testing.assert_allclose(f32.numpy(), got.numpy(), atol=2e-4)
    assert ssim(torch.from_numpy(x), torch.from_numpy(y)).item() == pytest.approx(
        got.mean().item()
    )


def test_ssim_properties_and_gradient():
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 1, 12, 12, dtype=torch.float64))
    y = torch.rand(2, 1, 12, 12, dtype=torch.float64)
    assert torch.allclose(ssim_map(x, y), ssim_map(y, x))
    assert ssim(x, y) < 0.5
    xs = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    ys = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, ys, window_size=5), (xs,))


def test_gaussian_blur_matches_scipy():
    rng = np.random.default_rng(1)
    img = rng.random((9, 14))
    got = gaussian_blur(torch.from_numpy(img)[None, None], sigma=2.0)[0, 0].numpy()
    ref = ndimage.gaussian_filter(img, 2.0, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(got, ref, atol=1e-12)


def _pair(n=4, c=1, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, size, size, generator=g)
    r = (x + 0.1 * torch.randn(n, c, size, size, generator=g)).clamp(0, 1)
    return x, r


def test_l2_map_and_reductions():
    x, r = _pair(c=3)
    sc = Scorer(ScoreConfig(map="l2", smooth_sigma=0, reduce="max"))
    m = sc.maps(x, r)
    ref = ((x.numpy() - r.numpy()) ** 2).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(m.numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(sc.scores(x, r).numpy(), ref.reshape(4, -1).max(1), rtol=1e-6)
    mean = Scorer(ScoreConfig(map="l2", smooth_sigma=0, reduce="mean")).scores(x, r)
    np.testing.assert_allclose(mean.numpy(), ref.reshape(4, -1).mean(1), rtol=1e-5)


def test_smoothing_and_ssim_map_scores():
    x, r = _pair()
    sc = Scorer(ScoreConfig(map="ssim", smooth_sigma=2.0, reduce="max"))
    xd, rd = x.double().numpy(), r.double().numpy()
    for i in range(4):
        raw = 1.0 - _np_ssim_map(xd[i], rd[i])
        ref = ndimage.gaussian_filter(raw, 2.0, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(sc.maps(x, r)[i, 0].numpy(), ref, atol=1e-5)
        assert sc.scores(x, r)[i].item() == pytest.approx(ref.max(), abs=1e-5)
    # smoothing lowers an isolated peak: max of smoothed <= max of raw
    raw = Scorer(ScoreConfig(map="ssim", smooth_sigma=0)).scores(x, r)
    assert (sc.scores(x, r) <= raw + 1e-6).all()


@pytest.mark.parametrize("kind", ["ssim", "msgms"])
def test_scores_batch_size_invariant_and_deterministic(kind):
    x, r = _pair(n=7, size=24)
    g = torch.Generator().manual_seed(0)
    grid = (torch.rand(4, 4, generator=g) + 0.5).tolist()
    for extra in ({}, {"standardize": True, "norm_mean": grid, "norm_std": grid}):
        big = Scorer(ScoreConfig(map=kind, batch_size=64, **extra)).scores(x, r)
        one = Scorer(ScoreConfig(map=kind, batch_size=1, **extra)).scores(x, r)
        three = Scorer(ScoreConfig(map=kind, batch_size=3, **extra)).scores(x, r)
        assert torch.equal(big, one) and torch.equal(big, three)
        assert torch.equal(big, Scorer(ScoreConfig(map=kind, batch_size=64, **extra)).scores(x, r))


def _np_gms(a: np.ndarray, b: np.ndarray, c: float = 0.0026) -> np.ndarray:
    """GMS of two 2-D arrays with scipy's Prewitt filters (normalised by 3)."""
    def mag(z):
        gx = ndimage.prewitt(z, axis=1, mode="nearest") / 3.0
        gy = ndimage.prewitt(z, axis=0, mode="nearest") / 3.0
        return np.sqrt(gx**2 + gy**2 + 1e-12)
    ga, gb = mag(a), mag(b)
    return (2 * ga * gb + c) / (ga**2 + gb**2 + c)


def test_gms_and_msgms_match_scipy_reference():
    x, r = _pair(n=2, size=16)
    xd, rd = x.double(), r.double()
    got = gms_map(xd, rd)
    for i in range(2):
        np.testing.assert_allclose(got[i, 0].numpy(), _np_gms(xd[i, 0].numpy(), rd[i, 0].numpy()),
                                   atol=1e-10)
    assert torch.equal(msgms_map(xd, rd, scales=1), got)
    # scale 2: 2x2 block means (numpy reshape), GMS, bilinear upsampling (half-pixel centres)
    pool = lambda z: z.reshape(8, 2, 8, 2).mean(axis=(1, 3))  # noqa: E731
    small = _np_gms(pool(xd[0, 0].numpy()), pool(rd[0, 0].numpy()))
    up = torch.nn.functional.interpolate(torch.from_numpy(small)[None, None], size=(16, 16),
                                         mode="bilinear", align_corners=False)[0, 0].numpy()
    ref2 = (_np_gms(xd[0, 0].numpy(), rd[0, 0].numpy()) + up) / 2
    np.testing.assert_allclose(msgms_map(xd, rd, scales=2)[0, 0].numpy(), ref2, atol=1e-10)
    assert torch.allclose(msgms_map(x, x), torch.ones(1))
    assert msgms_map(torch.rand(1, 1, 3, 3), torch.rand(1, 1, 3, 3), scales=4).shape == (1, 1, 3, 3)


def test_standardized_maps_are_per_position_z_scores():
    g = torch.Generator().manual_seed(3)
    normal = torch.rand(40, 1, 8, 8, generator=g)
    class Left(nn.Module):  # residuals 5x larger on the left half of every image
        def forward(self, x):
            w = torch.ones_like(x) * 0.9
            w[..., :4] = 0.5
            return x * w

    model = Left()
    cfg = fit_map_stats(ScoreConfig(map="l2", smooth_sigma=0), model, normal, grid=8, floor=0)
    maps = ((normal - model(normal)) ** 2).double()
    np.testing.assert_allclose(np.array(cfg.norm_mean), maps.mean(0)[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.array(cfg.norm_std), maps.std(0)[0].numpy(), rtol=1e-5)
    sc = Scorer(cfg)
    z = sc.maps(normal, model(normal))
    ref = (maps - maps.mean(0)) / maps.std(0)
    np.testing.assert_allclose(z.double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    # a coarser grid holds block means; the floor bounds the std from below
    cfg4 = fit_map_stats(ScoreConfig(map="l2", smooth_sigma=0), model, normal, grid=4, floor=0.5)
    raw4 = maps.std(0)[0].numpy().reshape(4, 2, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(np.array(cfg4.norm_std), np.maximum(raw4, 0.5 * raw4.mean()),
                               rtol=1e-6)
    mean4 = maps.mean(0)[0].numpy().reshape(4, 2, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(np.array(cfg4.norm_mean), mean4, rtol=1e-6)
    with pytest.raises(ConfigError, match="standardize"):
        Scorer(ScoreConfig(standardize=True))
    with pytest.raises(ConfigError, match="norm_std"):
        ScoreConfig(norm_std=[[1.0, 2.0], [1.0]])


@pytest.mark.parametrize("kind", ["l2", "ssim", "msgms"])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_non_finite_reconstructions_propagate(kind, reduce):
    x, r = _pair(n=3)
    sc = Scorer(ScoreConfig(map=kind, reduce=reduce, smooth_sigma=1.0))
    clean = sc.scores(x, r)
    bad = r.clone()
    bad[0, 0, 2, 3] = float("nan")
    bad[2, 0, 5, 5] = float("inf")
    s = sc.scores(x, bad)
    assert torch.isnan(s[0]) and not torch.isfinite(s[2])
    assert s[1] == clean[1]  # batch-mates unaffected


def test_score_config_errors():
    with pytest.raises(ConfigError, match="ScoreConfig.map"):
        ScoreConfig(map="l1")
    with pytest.raises(ConfigError, match="smooth_sigma"):
        ScoreConfig(smooth_sigma=-1)
    with pytest.raises(ConfigError, match="ssim_window"):
        ScoreConfig(ssim_window=4)
    with pytest.raises(FlipguardError, match="equal"):
        Scorer().scores(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9))


def test_calibrate_threshold():
    rng = np.random.default_rng(0)
    val = rng.normal(1.0, 0.1, 200)
    assert calibrate_threshold(val, 0.95) == pytest.approx(np.quantile(val, 0.95))
    assert calibrate_threshold(torch.tensor(val), 0.5) == pytest.approx(np.median(val))
    thr = calibrate_threshold(val, method="mean+kstd", k=2.0)
    assert thr == pytest.approx(val.mean() + 2.0 * val.std(ddof=1))
    # the threshold flags about 1 % of fresh normal scores
    fresh = rng.normal(1.0, 0.1, 20000)
    assert np.mean(fresh > calibrate_threshold(val, 0.99)) < 0.05
    with pytest.raises(ConfigError, match="val_scores"):
        calibrate_threshold([1.0, float("nan")])
    with pytest.raises(ConfigError, match="val_scores"):
        calibrate_threshold([])
    with pytest.raises(ConfigError, match="quantile"):
        calibrate_threshold([1.0, 2.0], quantile=1.5)
    with pytest.raises(ConfigError, match="method"):
        calibrate_threshold([1.0, 2.0], method="median")


class _Clamp(nn.Module):
    """'Reconstructs' by clamping to 0.5: bright defects leave a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(max=0.5) * self.scale


def test_reconstruct_batches_and_restores_mode():
    model = _Clamp().train()
    x = torch.rand(5, 1, 8, 8)
    calls = []
    out = reconstruct(model, x, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert torch.equal(out, x.clamp(max=0.5))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert model.training


def _defect_set(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.4
    masks = torch.zeros(n, 1, size, size)
    labels = np.array([i % 2 for i in range(n)])
    for i in np.flatnonzero(labels):
        r, c = torch.randint(0, size - 4, (2,), generator=g).tolist()
        a = 2 + i % 3
        masks[i, 0, r : r + a, c : c + a] = 1
    x = torch.where(masks > 0, torch.full_like(x, 0.95), x)
    return x, labels, masks


def test_evaluate_detector_matches_direct_metrics():
    x, labels, masks = _defect_set()
    x[0, 0, 0, 0] = 0.9  # one normal image with a bright speck -> imperfect separation
    sc = Scorer(ScoreConfig(map="l2", smooth_sigma=1.0, reduce="max"))
    model = _Clamp()
    recon = x.clamp(max=0.5)
    maps, scores = sc.maps(x, recon), sc.scores(x, recon)
    thr = 0.01
    res = evaluate_detector(model, sc, thr, x, labels, masks, batch_size=5)
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, scores.numpy()))
    assert res["pixel_auroc"] == pytest.approx(roc_auc_score(masks.numpy().ravel(),
                                                             maps.numpy().ravel()))
    assert res["aupro"] == pytest.approx(aupro(masks, maps))
    tm = threshold_metrics(labels, scores.numpy(), thr)
    for key in ("f1", "precision", "recall", "accuracy", "tp", "fp", "tn", "fn"):
        assert res[key] == pytest.approx(tm[key])
    assert res["n_test"] == 12 and res["threshold"] == thr and res["n_anomalous"] == 6
    assert res["oracle_f1"] >= res["f1"]
    assert threshold_metrics(labels, scores.numpy(), res["oracle_threshold"])["f1"] == (
        pytest.approx(res["oracle_f1"])
    )
    no_masks = evaluate_detector(model, sc, thr, x, labels, None)
    assert no_masks["pixel_auroc"] is None and no_masks["aupro"] is None
    assert no_masks["image_auroc"] == pytest.approx(res["image_auroc"])
    only_good = evaluate_detector(model, sc, thr, x[labels == 0], labels[labels == 0])
    assert only_good["image_auroc"] is None and only_good["n_test"] == 6
    with pytest.raises(ConfigError, match="labels"):
        evaluate_detector(model, sc, thr, x, labels[:3])


def test_select_map_follows_the_one_se_rule_on_validation_aurocs():
    from sklearn.metrics import roc_auc_score

    from flipguard.mapselect import select_map
    from flipguard.models.defects import paste_validation_defects

    g = torch.Generator().manual_seed(5)
    train = torch.rand(12, 1, 16, 16, generator=g) * 0.3 + 0.35
    val = torch.rand(6, 1, 16, 16, generator=g) * 0.3 + 0.35
    model = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)  # a "reconstruction"
    cfg, table = select_map(ScoreConfig(smooth_sigma=1.0, standardize=True), model, train, val)
    bad, _ = paste_validation_defects(val, seed=0)
    y = np.r_[np.zeros(6), np.ones(6)]
    ref, refse = {}, {}
    for name in ("ssim", "msgms", "l2"):
        c = fit_map_stats(ScoreConfig(map=name, smooth_sigma=1.0), model, train)
        sc = Scorer(c)
        with torch.no_grad():
            s = torch.cat([sc.scores(val, model(val)), sc.scores(bad, model(bad))]).numpy()
        ref[name] = roc_auc_score(y, s)
        refse[name] = auroc_se(y, s)
        assert table[name] == pytest.approx(ref[name], abs=1e-4)
    se = refse[max(ref, key=lambda k: ref[k])]
    order = ("msgms", "ssim", "l2")
    assert cfg.map == next(k for k in order if ref[k] >= max(ref.values()) - se)
    assert cfg.standardize and cfg.norm_mean is not None


def test_one_se_rule_prefers_msgms_only_within_noise():
    from flipguard.mapselect import MAP_CANDIDATES, choose_within_se

    assert MAP_CANDIDATES[0] == "msgms"
    t = {"msgms": 0.970, "ssim": 0.983, "l2": 0.990}
    assert choose_within_se(t, MAP_CANDIDATES, 0.0) == "l2"  # se 0: the plain argmax
    assert choose_within_se(t, MAP_CANDIDATES, 0.008) == "ssim"
    assert choose_within_se(t, MAP_CANDIDATES, 0.02) == "msgms"
    assert choose_within_se(t, ("l2", "ssim", "msgms"), 0.02) == "l2"  # order matters


def test_auroc_se_matches_the_monte_carlo_spread_of_binormal_aurocs():
    from flipguard.metrics import image_auroc

    rng = np.random.default_rng(0)
    for shift, n_pos, n_neg in ((2.9, 66, 66), (1.0, 40, 120), (0.0, 30, 30)):
        y = np.r_[np.zeros(n_neg), np.ones(n_pos)]
        aucs, ses = [], []
        for _ in range(1000):
            s = np.r_[rng.normal(0, 1, n_neg), rng.normal(shift, 1, n_pos)]
            aucs.append(image_auroc(y, s))
            ses.append(auroc_se(y, s))
        ratio = float(np.mean(ses)) / float(np.std(aucs))
        assert 0.88 < ratio < 1.12, (shift, ratio)
    # a constant score has no spread; one class is an error naming the function
    assert auroc_se([0, 0, 1, 1], [1, 1, 1, 1]) == 0.0
    with pytest.raises(FlipguardError, match="auroc_se"):
        auroc_se([0, 0, 1], [0.1, 0.2, 0.3])


def test_content_box_finds_the_fit_margin_of_real_loaded_images(tmp_path):
    """Images of unequal aspect read with resize='fit': the box found from the pixels alone
    is the placement the reader used; square and constant images keep their full extent."""
    from PIL import Image

    from flipguard.data import load_mvtec
    from flipguard.data.mvtec import _fit_geometry
    from flipguard.detect import content_box

    rng = np.random.default_rng(3)
    sizes = [(37, 90), (120, 41), (64, 64), (50, 51), (200, 33)]
    for split in ("train/good", "test/good", "test/crack"):
        (tmp_path / split).mkdir(parents=True)
    (tmp_path / "ground_truth/crack").mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"train/good/t{i}.png")
        Image.fromarray(arr).save(tmp_path / f"test/crack/c{i}.jpg", quality=90)
        Image.fromarray(np.zeros((h, w), np.uint8)).save(
            tmp_path / f"ground_truth/crack/c{i}_mask.png")
    Image.fromarray(np.full((30, 70), 128, np.uint8)).save(tmp_path / "test/good/flat.png")
    ds = load_mvtec(tmp_path, size=32, resize="fit")
    want = []
    for w, h in sizes:
        nw, nh, left, top = _fit_geometry((w, h), 32)
        want.append([top, top + nh, left, left + nw])
    assert content_box(ds.train).tolist() == want
    assert content_box(ds.test).tolist() == [[0, 32, 0, 32]] + want  # flat image: full
    stretched = load_mvtec(tmp_path, size=32, resize="stretch")
    assert content_box(stretched.train).tolist() == [[0, 32, 0, 32]] * len(sizes)


def test_ignore_margin_scores_the_max_over_the_content_box_only():
    from flipguard.detect import content_box

    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.pad(torch.rand(5, 1, 24, 14, generator=g), (5, 5, 0, 0),
                                mode="replicate")
    x[3] = torch.rand(1, 24, 24, generator=g)  # one image without margin
    r = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    r[:, :, :, :2] = 1 - x[:, :, :, :2]  # large residuals in the left margin
    base = fit_map_stats(ScoreConfig(map="msgms", smooth_sigma=1.0), nn.Identity(),
                         torch.rand(4, 1, 24, 24, generator=g), 8)
    plain = Scorer(base)
    masked = Scorer(base.model_copy(update={"ignore_margin": True}))
    m0, m1 = plain.maps(x, r), masked.maps(x, r)
    box = content_box(x)
    assert box.tolist() == [[0, 24, 5, 19]] * 3 + [[0, 24, 0, 24]] + [[0, 24, 5, 19]]
    for i, (t, b, le, ri) in enumerate(box.tolist()):
        inside = m0[i, 0, t:b, le:ri]
        assert torch.equal(m1[i, 0, t:b, le:ri], inside)  # content untouched
        assert masked.scores(x[i : i + 1], r[i : i + 1]).item() == inside.max().item()
        assert m1[i].max() == inside.max() and m1[i].min() == inside.min()
    assert (plain.scores(x, r) > masked.scores(x, r))[[0, 1, 2, 4]].all()  # margin ignored
    assert plain.scores(x, r)[3] == masked.scores(x, r)[3]
    side = masked.input_side(x).take(np.array([4, 0]))  # the campaign path agrees bit for bit
    assert torch.equal(masked.scores(x[[4, 0]], r[[4, 0]], side=side),
                       masked.scores(x[[4, 0]], r[[4, 0]]))
