"""Training loop: learns a tiny synthetic texture, is seed-deterministic, augments sanely."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from flipguard.detect import ScoreConfig, Scorer, reconstruct
from flipguard.errors import ConfigError
from flipguard.metrics import image_auroc
from flipguard.models import CAEConfig, build_cae
from flipguard.models.defects import corrupt_batch, paste_validation_defects
from flipguard.train import TrainConfig, TrainError, augment_batch, train_model


def _texture_data(n_train=48, n_test=12, size=32, seed=0):
    """Normal images: one smooth texture with brightness jitter and pixel noise; defects:
    the same plus a bright Gaussian blob. Returns (train, test, labels)."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.random((size, size)), 2.0, mode="wrap")
    base = (base - base.min()) / np.ptp(base)

    def normal(n):
        jitter = rng.uniform(0.9, 1.0, (n, 1, 1))
        return np.clip(base * jitter + rng.normal(0, 0.02, (n, size, size)), 0, 1)

    yy, xx = np.mgrid[:size, :size]
    bad = normal(n_test)
    for i in range(n_test):
        cy, cx = rng.uniform(5, size - 5, 2)
        bad[i] = np.clip(bad[i] + 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0), 0, 1)
    test = np.concatenate([normal(n_test), bad])

    def t(a):
        return torch.from_numpy(a[:, None]).float()

    return t(normal(n_train)), t(test), np.repeat([0, 1], n_test)


def _tiny(size=32, seed=0):
    return build_cae(CAEConfig(input_size=size, width=0.25, latent_dim=8, seed=seed))


def test_training_learns_and_detects_defects():
    train, test, labels = _texture_data()
    model = _tiny()
    before = ((reconstruct(model, test[:12]) - test[:12]) ** 2).mean().item()
    seen = []
    cfg = TrainConfig(epochs=15, batch_size=8, lr=3e-3, loss="l2+ssim", weight_decay=0)
    hist = train_model(model, train, cfg, progress=lambda e, loss: seen.append((e, loss)))
    assert len(hist) == 15 and seen == list(zip(range(1, 16), hist, strict=True))
    assert hist[-1] < 0.2 * hist[0]
    assert not model.training
    recon = reconstruct(model, test)
    after = ((recon[:12] - test[:12]) ** 2).mean().item()
    assert after < 0.25 * before  # normal images are now reconstructed well
    scores = Scorer(ScoreConfig(map="l2", smooth_sigma=1.0, reduce="max")).scores(test, recon)
    assert image_auroc(labels, scores) > 0.9


def _train_once(seed: int, loss: str = "l2+ssim") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    images = torch.rand(10, 1, 16, 16, generator=g)
    model = _tiny(size=16)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, loss=loss, augment=True, rot90=True,
                      seed=seed)
    train_model(model, images, cfg)
    return model.state_dict()


def test_same_seed_gives_identical_weights():
    a, b, c = _train_once(0), _train_once(0), _train_once(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    init = _tiny(size=16).state_dict()
    assert not torch.equal(a["encoder.0.weight"], init["encoder.0.weight"])


@pytest.mark.parametrize("loss", ["l2", "ssim", "l2+ssim", "l2+ssim+msgms"])
def test_each_loss_decreases(loss):
    train, _, _ = _texture_data(n_train=16, n_test=1, size=16)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=3e-3, loss=loss, weight_decay=0)
    hist = train_model(_tiny(size=16), train, cfg)
    assert hist[-1] < hist[0]


def test_riad_loss_adds_the_gradient_term():
    # The MS-GMS term sees edges, not brightness: a uniform shift leaves every gradient
    # magnitude (so the GMS) unchanged, a blur does not.
    from flipguard.train import _loss

    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert float(_loss("l2+ssim+msgms", x, x)) == pytest.approx(0.0, abs=1e-6)
    shifted = x + 0.1
    extra = _loss("l2+ssim+msgms", x, shifted) - _loss("l2+ssim", x, shifted)
    assert float(extra) == pytest.approx(0.0, abs=1e-6)
    assert float(_loss("l2", x, shifted)) == pytest.approx(0.01, rel=1e-4)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    extra = _loss("l2+ssim+msgms", x, blurred) - _loss("l2+ssim", x, blurred)
    assert float(extra) > 0.05


def test_augment_batch_properties():
    x = torch.rand(16, 2, 8, 8)
    plain = augment_batch(x, torch.Generator().manual_seed(5), brightness=0.0)
    # flips only permute pixels within each image
    for a, b in zip(x, plain, strict=True):
        assert torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values)
        assert any(torch.equal(b, v) for v in (a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)))
    assert not torch.equal(plain, x)  # 16 images: some flip happens
    jit = augment_batch(x, torch.Generator().manual_seed(5), brightness=0.1)
    diff = (jit - plain).flatten(1)
    assert diff.abs().max() <= 0.1 + 1e-6 and ((jit >= 0) & (jit <= 1)).all()
    inner = (plain > 0.1) & (plain < 0.9)  # away from clamping: one constant shift per image
    for d, m in zip(diff, inner.flatten(1), strict=True):
        assert torch.allclose(d[m], d[m][0].expand(int(m.sum())), atol=1e-6)
    rot = augment_batch(x, torch.Generator().manual_seed(7), brightness=0.0, rot90=True)
    again = augment_batch(x, torch.Generator().manual_seed(7), brightness=0.0, rot90=True)
    assert torch.equal(rot, again)
    rots = [torch.rot90(v, k, dims=(-2, -1)) for v in (x[0], x[0].flip(-1)) for k in range(4)]
    candidates = rots + [r.flip(-2) for r in rots]
    assert any(torch.equal(rot[0], c) for c in candidates)


def test_train_errors():
    model = _tiny(size=16)
    bad = torch.rand(4, 1, 16, 16)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(TrainError, match="finite"):
        train_model(model, bad, TrainConfig(epochs=1))
    with pytest.raises(TrainError, match="non-empty"):
        train_model(model, torch.rand(0, 1, 16, 16), TrainConfig(epochs=1))
    with pytest.raises(TrainError, match="TrainConfig.device"):
        train_model(model, torch.rand(2, 1, 16, 16), TrainConfig(epochs=1, device="tpu7"))
    with pytest.raises(ConfigError, match="TrainConfig.loss"):
        TrainConfig(loss="l1")
    with pytest.raises(ConfigError, match="TrainConfig.epochs"):
        TrainConfig(epochs=0)


def test_inpainting_objective_feeds_corrupted_inputs_and_clean_targets():
    # An identity 1x1 convolution reconstructs clean inputs perfectly (loss 0); with the
    # inpainting objective its loss is the corruption itself, so it must be > 0 at once.
    images = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25

    def identity() -> nn.Conv2d:
        conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            conv.weight.fill_(1.0)
            conv.bias.zero_()
        return conv

    plain = train_model(identity(), images, TrainConfig(epochs=1, lr=1e-9, loss="l2"))
    inp = train_model(identity(), images, TrainConfig(epochs=1, lr=1e-9, loss="l2", inpaint=1.0))
    assert plain[0] < 1e-12 < 1e-4 < inp[0]


def test_corrupt_batch_changes_only_masked_pixels_of_chosen_images():
    x = torch.rand(400, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    y, m = corrupt_batch(x, torch.Generator().manual_seed(2), p=0.5)
    y2, m2 = corrupt_batch(x, torch.Generator().manual_seed(2), p=0.5)
    assert torch.equal(y, y2) and torch.equal(m, m2)  # seeded
    chosen = m.flatten(1).amax(1) > 0
    assert abs(int(chosen.sum()) - 200) < 4 * 10  # binomial(400, 0.5): sd 10
    assert torch.equal(y[~chosen], x[~chosen])
    assert torch.equal(y[m.expand_as(y) == 0], x[m.expand_as(x) == 0])  # outside masks: exact
    assert ((y >= 0) & (y <= 1)).all() and set(m.unique().tolist()) <= {0.0, 1.0}
    area = m[chosen].flatten(1).mean(1)
    assert float(area.max()) < 0.2 and float(area.min()) > 0


def test_validation_defects_shift_exactly_the_mask_by_the_image_contrast():
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.2 + 0.4
    bad, m = paste_validation_defects(x, seed=4, contrast=2.0)
    for i in range(6):
        inside = m[i, 0] > 0
        assert inside.any() and torch.equal(bad[i, 0][~inside], x[i, 0][~inside])
        d = (bad[i, 0] - x[i, 0])[inside]
        delta = max(0.05, 2.0 * float(x[i].std()))
        assert torch.allclose(d.abs(), torch.full_like(d, delta), atol=1e-6)
        assert (d > 0).all() or (d < 0).all()
    again, _ = paste_validation_defects(x, seed=4, contrast=2.0)
    assert torch.equal(bad, again)


def _reference_loop(data, epochs, batch, lr, schedule, ema):
    """Independent re-implementation: Adam with the closed-form cosine learning rate
    lr * (1 + cos(pi t / T)) / 2 set before step t + 1, and the EMA recurrence
    e <- d e + (1 - d) w (e = w after the first step); returns the final state."""
    import math

    model = _tiny(size=16)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(0)
    n = data.shape[0]
    total = epochs * -(-n // batch)
    avg, t = None, 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            x = data[perm[i : i + batch]]
            for g in opt.param_groups:
                g["lr"] = lr * (1 + math.cos(math.pi * t / total)) / 2 if schedule else lr
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), x).backward()
            opt.step()
            t += 1
            w = {k: v.detach().clone() for k, v in model.state_dict().items()}
            avg = w if avg is None else {k: ema * avg[k] + (1 - ema) * w[k] for k in w}
    return avg if ema else {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("schedule", "ema"), [("constant", 0.0), ("cosine", 0.0),
                                               ("constant", 0.9), ("cosine", 0.8)])
def test_cosine_schedule_and_weight_ema_match_closed_forms(schedule, ema):
    train, _, _ = _texture_data(n_train=12, n_test=1, size=16)
    cfg = TrainConfig(epochs=4, batch_size=5, lr=3e-3, loss="l2", schedule=schedule, ema=ema)
    model = _tiny(size=16)
    train_model(model, train, cfg)
    got = model.state_dict()
    want = _reference_loop(train, 4, 5, 3e-3, schedule == "cosine", ema)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    # the reference discriminates: the other schedule / no averaging gives other weights
    other = _reference_loop(train, 4, 5, 3e-3, schedule != "cosine", 0.0 if ema else 0.9)
    assert max((got[k] - other[k]).abs().max().item() for k in want) > 1e-4
