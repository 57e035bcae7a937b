"""Criticality predictor: per-element flip ratios against closed-form gradients and
independent (numpy) bit flips, activations, classifiers, stratum ordering, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.criticality import (
    EXTREME,
    Predictor,
    classes_of_rho,
    criterion_k,
    differentiable_score_fn,
)
from flipguard.faults import Fault, SiteSpace
from flipguard.inject import ClassificationTask, DetectionTask


def sq_score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Detector score with a closed-form gradient: s = |y|^2."""
    return (y ** 2).sum(1)


def np_flip(values: np.ndarray, bit: int) -> np.ndarray:
    """Independent reference of an FP32 bit flip (numpy bit view)."""
    words = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return (words ^ np.uint32(1 << bit)).view(np.float32)


def kth(values: np.ndarray, k: int) -> np.ndarray:
    """k-th largest along axis 0, clamped at 0 (0 when fewer than k rows)."""
    if values.shape[0] < k:
        return np.zeros(values.shape[1:])
    return np.maximum(np.sort(values, axis=0)[::-1][k - 1], 0.0)


def linear_detector(seed: int = 0, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 2, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(2, 3, generator=g))
    x = torch.randn(n, 3, generator=g)
    s = sq_score(x, net(x)).detach().numpy().astype(np.float64)
    thr = float(np.median(s))
    labels = (torch.rand(n, generator=g) > 0.5).long().numpy()
    return net, x, s, thr, labels


def test_criterion_k_and_class_bins():
    assert criterion_k("accuracy-drop:0.01", 700) == (8, True)
    assert criterion_k("accuracy-drop:0.01", 100) == (2, True)  # a drop of exactly 1 pp is not > δ
    assert criterion_k("any-flip", 700) == (1, False)
    assert criterion_k("mismatch:0.1", 25) == (3, False)
    rho = np.array([0.0, 9e-4, 1e-3, 0.05, 0.1, 0.99, 1.0, 1e30, np.inf])
    assert classes_of_rho(rho).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, EXTREME]


def test_weight_ratios_and_rho_match_closed_form():
    net, x, s, thr, labels = linear_detector()
    pred = Predictor.build(net, x, DetectionTask(sq_score, thr, labels), "accuracy-drop:0.1")
    k = 2  # floor(0.1 * 10) + 1
    assert pred.info["k"] == k
    counted = (s > thr) == (labels > 0)
    y = net(x).detach().numpy().astype(np.float64)
    xs = x.numpy().astype(np.float64)
    grad = 2 * y[:, :, None] * xs[:, None, :]  # ds_i / dW[a, b]
    r = (grad / (thr - s)[:, None, None])[counted].reshape(int(counted.sum()), -1)
    st = pred.tensors[("weight", "0")]
    np.testing.assert_allclose(st.r_pos.numpy(), kth(r, k), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.r_neg.numpy(), kth(-r, k), rtol=1e-5, atol=1e-7)
    w = net[0].weight.detach().numpy().reshape(-1)
    rho = pred.rho("0")[:, :, 0]
    for b in range(32):
        with np.errstate(invalid="ignore", over="ignore"):
            faulty = np_flip(w, b).astype(np.float64)
            d = faulty - w
            ref = np.where(d > 0, d * kth(r, k), -d * kth(-r, k))
        ref[~np.isfinite(faulty) | (np.abs(faulty) > 100 * np.abs(w).max())] = np.inf
        np.testing.assert_allclose(rho[:, b], ref, rtol=1e-5)
    small = np.abs(w) < 2  # bit 30 clear: its flip multiplies by 2^128
    assert small.sum() >= 3 and (rho[small, 30] == np.inf).all() and (rho[~small, 30] < 1e30).all()
    assert (classes_of_rho(rho[:, 0]) <= 1).all()


def test_activation_ratios_match_closed_form():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).eval()
    x = torch.randn(9, 3, generator=g)
    s = sq_score(x, net(x)).detach().numpy().astype(np.float64)
    thr = float(np.quantile(s, 0.4))
    labels = np.zeros(9, dtype=np.int64)
    pred = Predictor.build(net, x, DetectionTask(sq_score, thr, labels), "any-flip",
                           targets=("activation",), layers=["0"])
    a = net[0](x).detach().numpy()  # (N, 4), the faulted activation
    y = net(x).detach().numpy().astype(np.float64)
    g_act = 2 * y @ net[1].weight.detach().numpy().astype(np.float64)  # ds_i / da_i
    r = g_act / (thr - s)[:, None]
    ref = np.zeros((4, 32))
    for b in range(32):
        faulty = np_flip(a, b)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(np.isfinite(faulty), faulty.astype(np.float64) - a, 0.0)
        ref[:, b] = kth(d * r, 1)
        bad = (~np.isfinite(faulty) | (np.abs(faulty) > 100 * np.abs(a).max())).any(0)
        ref[bad, b] = np.inf
    got = pred.rho("0", "activation")[:, :, 0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-12)
    assert (got[:, 30] == np.inf).all()


def test_classifier_margin_ratios_match_closed_form():
    g = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4)).eval()
    x = torch.randn(12, 3, generator=g)
    z = net(x).detach().numpy().astype(np.float64)
    top = z.argmax(1)
    labels = np.where(np.arange(12) % 4 == 0, (top + 1) % 4, top)  # a few wrong
    pred = Predictor.build(net, x, ClassificationTask(labels), "accuracy-drop:0.1")
    other = np.where(np.eye(4)[top] > 0, -np.inf, z).argmax(1)
    margin = z[np.arange(12), top] - z[np.arange(12), other]
    xs = x.numpy().astype(np.float64)
    grad = np.zeros((12, 4, 3))
    grad[np.arange(12), top] += xs
    grad[np.arange(12), other] -= xs
    r = (grad / -margin[:, None, None])[top == labels].reshape(-1, 12)
    np.testing.assert_allclose(pred.tensors[("weight", "0")].r_pos.numpy(), kth(r, 2),
                               rtol=1e-5, atol=1e-7)


def test_cae_gradients_match_finite_differences():
    from flipguard.detect import ScoreConfig, Scorer
    from models_zoo import smooth_images, tiny_cae

    net, x = tiny_cae(size=16, width=0.125, latent=4), smooth_images(5, size=16)
    scorer = Scorer(ScoreConfig(map="ssim", smooth_sigma=1.0, reduce="max"))
    with torch.no_grad():  # the differentiable scorer gives the Scorer's scores exactly
        assert torch.equal(differentiable_score_fn(scorer.scores)(x, net(x)),
                           scorer.scores(x, net(x)))
    net, x = net.double(), x.double()
    score = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)  # noqa: E731
    with torch.no_grad():
        s = score(x, net(x)).numpy()
    thr = float(s.max() + 0.01)
    pred = Predictor.build(net, x, DetectionTask(score, thr, np.zeros(5, np.int64)),
                           "any-flip", layers=["encoder.0", "decoder.16"])
    for layer in ("encoder.0", "decoder.16"):
        w = net.get_submodule(layer).weight
        st = pred.tensors[("weight", layer)]
        for j in (0, 7):
            idx, h = np.unravel_index(j, tuple(w.shape)), 1e-6
            with torch.no_grad():
                w[idx] += h
                up = score(x, net(x)).numpy()
                w[idx] -= 2 * h
                down = score(x, net(x)).numpy()
                w[idx] += h
            fd = ((up - down) / (2 * h)) / (thr - s)  # per-image flip ratio d s_i / m_i
            np.testing.assert_allclose(st.r_pos[j].item(), max(fd.max(), 0), rtol=1e-4,
                                       atol=1e-9)
            np.testing.assert_allclose(st.r_neg[j].item(), max((-fd).max(), 0), rtol=1e-4,
                                       atol=1e-9)


def test_stratum_classes_follow_planner_order_and_persist(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.2),
                        nn.ConvTranspose2d(2, 3, 2, stride=2)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 6, 6, generator=g)
    score = lambda a, b: b.flatten(1).abs().amax(1)  # noqa: E731
    s = score(x, net(x)).detach().numpy()
    task = DetectionTask(score, float(np.median(s)), np.arange(6) % 2)
    kinds = ("stuck-at-0", "stuck-at-1")
    pred = Predictor.build(net, x, task, "any-flip", kinds=kinds)
    space = SiteSpace(net)
    for kernel, bits in ((1, None), (None, "exponent")):
        cls = pred.classes("2", kernel=kernel, bits=bits, kinds=kinds)
        j = np.arange(cls.size)
        idx, bit = space.decode("2", j // 2, kernel=kernel, bits=bits)
        faults = [Fault("weight", "2", int(i), (int(b),), kinds[int(q) % 2])
                  for i, b, q in zip(idx, bit, j, strict=True)]
        assert cls.tolist() == pred.class_of(faults).tolist()
        assert cls.size == space.population("2", kernel=kernel, bits=bits) * 2
    noop = [Fault("weight", "0", 0, (31,), "stuck-at-0" if net[0].weight.view(-1)[0] >= 0
                  else "stuck-at-1")]
    assert pred.class_of(noop).tolist() == [0]  # a stuck-at equal to the stored bit: harmless
    loaded = Predictor.load(pred.save(tmp_path / "p.pt"), net)
    for layer in ("0", "2"):
        assert np.array_equal(loaded.classes(layer, kinds=kinds),
                              pred.classes(layer, kinds=kinds))
    probs = pred.probability_matrix("0")
    sw = pred.site_weights("weight", "0", np.array([0, 3]), np.array([30, 2]))
    assert sw.tolist() == [probs[0, 30], probs[3, 2]] and probs[0, 30] > probs[3, 2]
    with pytest.raises(Exception, match="kinds"):
        Predictor.build(net, x, task, "any-flip", targets=("activation",),
                        layers=["0"]).rho("0", "activation", kinds=["flip", "stuck-at-1"])


def test_ra_proposal_is_the_predictor_and_reduces_is_variance():
    from flipguard.inject import Engine
    from flipguard.ra import EngineEvaluator, ProposalContext, build_exposure, defensive
    from flipguard.ra.proposal import CriticalityProposal, make_proposal

    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    for prm in net.parameters():
        nn.init.normal_(prm, std=0.7, generator=g)
    x = torch.randn(16, 4, generator=g)
    labels = net(x).argmax(1).detach().numpy()
    labels[:2] = (labels[:2] + 1) % 3
    net.eval()
    engine = Engine(net, x, ClassificationTask(labels))
    evaluate = EngineEvaluator(engine)
    p = build_exposure(net, x[:1], "uniform", targets=("weight",))
    ctx = ProposalContext(net, x, labels, "classification", evaluate,
                          evaluate.golden_accuracy)
    assert isinstance(make_proposal("criticality"), CriticalityProposal)
    h = CriticalityProposal().heuristic(p, ctx)
    sites, prob = p.enumerate()
    pred = Predictor.build(net, x, ClassificationTask(labels), "accuracy-drop:0.01")
    w = np.concatenate([pred.site_weights(*key, sites.index[sites.block == i],
                                          sites.bit[sites.block == i])
                        for i, key in enumerate(sites.keys)])
    order = np.concatenate([np.flatnonzero(sites.block == i) for i in range(len(sites.keys))])
    ratio = h.prob(sites)[order] / prob[order]
    np.testing.assert_allclose(ratio / w, (ratio / w)[0], rtol=1e-9)  # h ∝ P x π(class)
    drop = evaluate.golden_accuracy - evaluate(sites)  # exhaustive ground truth
    q = defensive(p, h, 0.2).prob(sites)
    assert (q > 0).all()  # covers P: the IS estimator stays unbiased
    mean = float((prob * drop).sum())
    var_mc = float((prob * drop ** 2).sum()) - mean ** 2
    var_is = float((prob ** 2 * drop ** 2 / q).sum()) - mean ** 2
    assert mean > 0 and var_is < 0.5 * var_mc
