"""RA estimators against exhaustive ground truth on a tiny classifier (every site enumerated
and evaluated by brute force with in-place bit patching)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from flipguard.errors import ConfigError
from flipguard.ra import (
    AdaptiveMixture,
    AdaptiveProposal,
    BitFieldProposal,
    Block,
    CachedEvaluator,
    EngineEvaluator,
    GradientProposal,
    PilotProposal,
    ProposalContext,
    RAStore,
    SiteDistribution,
    Sites,
    SiteWeightProposal,
    Term,
    bit_sensitivity,
    build_exposure,
    defensive,
    estimate_ra,
    exhaustive,
    reweight,
    summarise,
)

TARGETS = ("weight", "bias", "activation")
SEEDS = 200


def covers_at_least(cover: int, n: int, level: float = 0.95) -> bool:
    """One-sided binomial test: a coverage count not significantly below ``level``."""
    return binomtest(cover, n, level, alternative="less").pvalue > 1e-3


def _tiny() -> tuple[nn.Module, torch.Tensor, np.ndarray]:
    """A conv classifier trained on 3 noisy prototypes (two labels flipped: golden 22/24)."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    for prm in net.parameters():
        nn.init.normal_(prm, std=0.5, generator=g)
    protos = torch.rand(3, 1, 4, 4, generator=g)
    y = torch.arange(24) % 3
    x = (protos[y] + 0.15 * torch.randn(24, 1, 4, 4, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    labels = y.numpy().copy()
    labels[:2] = (labels[:2] + 1) % 3
    return net.eval(), x, labels


class BruteForce:
    """Reference evaluator: XOR the bit into the stored float32 word (numpy view), run the
    whole batch, restore; activation faults via a forward hook on the layer's output."""

    def __init__(self, net: nn.Module, x: torch.Tensor, y: np.ndarray) -> None:
        self.net, self.x, self.y, self.calls = net, x, y, 0
        self.golden_accuracy = self._acc()

    def _acc(self) -> float:
        with torch.no_grad():
            return float((self.net(self.x).argmax(1).numpy() == self.y).mean())

    def one(self, target: str, layer: str, index: int, bit: int) -> float:
        mod = self.net.get_submodule(layer)
        mask = np.uint32(1 << bit)
        if target == "activation":
            def hook(_m, _i, out):
                a = out.detach().clone().numpy().reshape(out.shape[0], -1)
                a.view(np.uint32)[:, index] ^= mask
                return torch.from_numpy(a.reshape(out.shape))
            h = mod.register_forward_hook(hook)
            try:
                return self._acc()
            finally:
                h.remove()
        words = getattr(mod, target).detach().numpy().reshape(-1).view(np.uint32)
        words[index] ^= mask
        try:
            return self._acc()
        finally:
            words[index] ^= mask

    def __call__(self, sites: Sites) -> np.ndarray:
        self.calls += len(sites)
        return np.array([self.one(*r) for r in sites.records()])


class Table:
    """Lookup of the exhaustive per-site accuracies (fast evaluator for coverage runs)."""

    def __init__(self, p, acc: np.ndarray) -> None:
        sizes = [b.numel * b.bit_weights.size for b in p.blocks]
        self.offset, self.nbits, self.acc = np.cumsum([0] + sizes[:-1]), 32, acc
        self.pos = {k: i for i, k in enumerate(p.keys)}

    def __call__(self, sites: Sites) -> np.ndarray:
        blk = np.array([self.pos[k] for k in sites.keys])[sites.block]
        return self.acc[self.offset[blk] + sites.index * self.nbits + sites.bit]


@pytest.fixture(scope="module")
def world():
    torch.set_num_threads(1)
    net, x, y = _tiny()
    ref = BruteForce(net, x, y)
    dists = {hw: build_exposure(net, x[:1], hw, TARGETS) for hw in ("uniform", "systolic")}
    ra_u, sites, _, acc = exhaustive(dists["uniform"], ref, ref.golden_accuracy)
    table = Table(dists["uniform"], acc)
    exact = {"uniform": ra_u}
    for hw in ("systolic",):
        s, prob = dists[hw].enumerate()
        exact[hw] = float(np.sum(prob * table(s)))
    return {"net": net, "x": x, "y": y, "ref": ref, "p": dists, "exact": exact,
            "table": table, "sites": sites, "acc": acc}


def test_exact_ra_differs_between_exposure_models(world):
    ex, g = world["exact"], world["ref"].golden_accuracy
    assert g == pytest.approx(22 / 24)
    assert 0 < g - ex["uniform"] < 0.5 and 0 < g - ex["systolic"] < 0.5
    # uniform: the plain mean over every enumerated site
    assert ex["uniform"] == pytest.approx(float(world["acc"].mean()))
    # the exposure models weight the same sites differently (how much RA moves with that is a
    # property of the toy model, so no margin on the RA values themselves)
    (su, pu), (ss, ps) = (world["p"][hw].enumerate() for hw in ("uniform", "systolic"))
    assert su.keys == ss.keys and np.array_equal(su.index, ss.index)
    assert pu.sum() == pytest.approx(1.0) and ps.sum() == pytest.approx(1.0)
    assert 0.5 * np.abs(pu - ps).sum() > 0.05
    # and each exact RA is the exposure-weighted accuracy, independently recomputed
    assert ex["systolic"] == pytest.approx(float(ps @ world["acc"]), rel=1e-12)
    assert ex["uniform"] != ex["systolic"]


def test_engine_evaluator_matches_brute_force(world):
    from flipguard.inject import ClassificationTask, Engine

    eng = Engine(world["net"], world["x"], ClassificationTask(world["y"]), batch_size=24)
    ev = EngineEvaluator(eng)
    assert ev.golden_accuracy == world["ref"].golden_accuracy
    pick = np.random.default_rng(0).choice(len(world["sites"]), 300, replace=False)
    sub = world["sites"].take(np.sort(pick))
    assert np.array_equal(ev(sub), world["acc"][np.sort(pick)])


def _coverage(world, hw, q=None, bound=None, n=1000):
    p, table, exact = world["p"][hw], world["table"], world["exact"][hw]
    g = world["ref"].golden_accuracy
    ests = [estimate_ra(p, table, g, q=q, target_margin=0.0, max_samples=n, batch=500,
                        seed=s, weight_bound=bound) for s in range(SEEDS)]
    ra = np.array([e.ra for e in ests])
    cover = sum(e.ci[0] <= exact <= e.ci[1] for e in ests)
    return ra, cover, exact, ests


@pytest.mark.parametrize("hw", ["uniform", "systolic"])
def test_monte_carlo_is_unbiased_and_covers(world, hw):
    ra, cover, exact, ests = _coverage(world, hw)
    assert abs(ra.mean() - exact) < 4 * ra.std(ddof=1) / math.sqrt(SEEDS)
    assert covers_at_least(cover, SEEDS), cover
    assert all(e.ess == e.samples == 1000 and e.stopped == "max-samples" for e in ests)
    assert all(e.interval == "betting-cs" for e in ests)
    # not trivially wide: within 2x of the normal half-width with the exact sd
    sites, prob = world["p"][hw].enumerate()
    d = world["ref"].golden_accuracy - world["table"](sites)
    sd = math.sqrt(prob @ d ** 2 - (prob @ d) ** 2)
    hw_mean = np.mean([e.half_width for e in ests])
    assert hw_mean < 2.0 * 1.96 * sd / math.sqrt(1000), (hw_mean, sd)


@pytest.mark.parametrize("proposal", ["bitfield", "pilot", "gradient"])
def test_importance_sampling_is_unbiased_covers_and_bounded(world, proposal):
    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    ctx = ProposalContext(world["net"], world["x"], world["y"], "classification",
                          world["table"], g, "fp32", seed=0)
    prop = {"bitfield": BitFieldProposal(), "pilot": PilotProposal(n=3),
            "gradient": GradientProposal()}[proposal]
    q = defensive(p, prop.heuristic(p, ctx), alpha=0.2)
    sites, prob = p.enumerate()
    w = prob / q.prob(sites)
    assert w.max() <= 5 + 1e-9  # P/q <= 1/alpha
    drop = g - world["table"](sites)
    assert np.sum(q.prob(sites) * w * drop) == pytest.approx(np.sum(prob * drop), abs=1e-12)
    ra, cover, exact, ests = _coverage(world, "systolic", q, 5.0)
    assert abs(ra.mean() - exact) < 4 * ra.std(ddof=1) / math.sqrt(SEEDS)
    assert covers_at_least(cover, SEEDS), cover
    # exact per-sample variance (enumeration): the heuristics reduce it below plain MC
    d_mean = np.sum(prob * drop)
    var_is = np.sum(prob * w * drop ** 2) - d_mean ** 2
    var_mc = np.sum(prob * drop ** 2) - d_mean ** 2
    assert var_is < 0.8 * var_mc
    # ESS: the MC-equivalent sample size n V_MC / V_IS, close to its exact value on average
    ess_exact = 1000 * var_mc / var_is
    assert 0.7 * ess_exact < np.median([e.ess for e in ests]) < 1.3 * ess_exact


def test_reweighting_equals_fresh_estimate_under_other_model(world, tmp_path):
    pu, ps, g = world["p"]["uniform"], world["p"]["systolic"], world["ref"].golden_accuracy
    q = defensive(pu, BitFieldProposal().heuristic(pu, ProposalContext()), 0.3)
    assert pu.covers(ps)
    sites, prob_s = ps.enumerate()
    qa = q.prob(sites)
    drop = g - world["table"](sites)
    # exhaustive case, exactly: E_q[(P'/q) d] = sum P' d, the drop under the other model
    assert np.sum(qa * (ps.prob(sites) / qa) * drop) == pytest.approx(
        g - world["exact"]["systolic"], abs=1e-12)
    # IS samples under uniform (a few through the store), re-weighted to systolic
    store = RAStore(tmp_path / "ra.sqlite", {"model": "tiny"})
    bound = float((ps.prob(sites) / q.prob(sites)).max())
    rw, fresh, cover = [], [], 0
    for seed in range(SEEDS):
        kept: list = []
        key = f"s{seed}"
        rec = store.recorder(key) if seed < 3 else (lambda *a, kept=kept: kept.append(a))
        if seed < 3:
            store.open_stream(key, {"seed": seed})
        est = estimate_ra(pu, world["table"], g, q=q, target_margin=0.0, max_samples=600,
                          batch=600, seed=seed, record=rec)
        if seed < 3:
            s, qq, pp, acc = store.samples(key)
            assert np.allclose(pp, pu.prob(s)) and np.allclose(qq, q.prob(s))
        else:
            _, s, qq, pp, acc = kept[0]
        same = reweight(s, qq, acc, pu, g, bound=1 / 0.3)
        assert same.ra == pytest.approx(est.ra, abs=1e-12)  # P' = P: nothing changes
        r = reweight(s, qq, acc, ps, g, bound=bound)
        rw.append(r.ra)
        cover += r.ci[0] <= world["exact"]["systolic"] <= r.ci[1]
        fresh.append(estimate_ra(ps, world["table"], g, target_margin=0.0, max_samples=600,
                                 batch=600, seed=10_000 + seed).ra)
    rw_a, fresh_a, exact = np.array(rw), np.array(fresh), world["exact"]["systolic"]
    se = math.sqrt(rw_a.var(ddof=1) / SEEDS + fresh_a.var(ddof=1) / SEEDS)
    assert abs(rw_a.mean() - fresh_a.mean()) < 4 * se
    assert abs(rw_a.mean() - exact) < 4 * rw_a.std(ddof=1) / math.sqrt(SEEDS)
    assert covers_at_least(cover, SEEDS), cover
    with pytest.raises(ConfigError, match="bound"):
        reweight(s, qq, acc, ps, g)  # no stated bound: no valid interval
    store.close()


def test_sequential_stopping_stops_at_first_batch_within_margin(world):
    p, g, table = world["p"]["uniform"], world["ref"].golden_accuracy, world["table"]
    kw = {"target_margin": 0.03, "batch": 50, "min_samples": 100, "seed": 4}
    est = estimate_ra(p, table, g, max_samples=100_000, **kw)
    assert est.stopped == "target-margin" and est.half_width <= 0.03
    assert est.samples % 50 == 0 and est.samples >= 100
    before = estimate_ra(p, table, g, max_samples=est.samples - 50, **kw)
    assert before.samples < 100 or before.half_width > 0.03
    assert before.stopped == "max-samples"
    capped = estimate_ra(p, table, g, max_samples=130, **{**kw, "target_margin": 0.0})
    assert capped.samples == 130 and capped.stopped == "max-samples"


def test_resume_is_deterministic_and_does_not_reinject(world, tmp_path):
    p, g, ref = world["p"]["systolic"], world["ref"].golden_accuracy, world["ref"]
    kw = {"target_margin": 0.0, "batch": 40, "seed": 9}
    store = RAStore(tmp_path / "ra.sqlite", {"model": "tiny"})
    store.open_stream("k", {})
    ev = CachedEvaluator(ref, store)
    estimate_ra(p, ev, g, max_samples=120, record=store.recorder("k"), **kw)
    first = ev.injected
    store.close()
    store = RAStore(tmp_path / "ra.sqlite", {"model": "tiny"})
    assert store.open_stream("k", {}) == 120
    ev2 = CachedEvaluator(ref, store)
    resumed = estimate_ra(p, ev2, g, max_samples=200, record=store.recorder("k"), **kw)
    fresh = estimate_ra(p, world["table"], g, max_samples=200, **kw)
    assert resumed.ra == fresh.ra and resumed.ci == fresh.ci
    assert 0 < ev2.injected <= 80 and first <= 120
    s, _, _, acc = store.samples("k")
    assert len(s) == 200 and np.array_equal(acc, world["table"](s))
    with pytest.raises(Exception, match="fingerprint"):
        RAStore(tmp_path / "ra.sqlite", {"model": "other"})
    store.close()


def test_summarise_closed_form():
    d = np.array([0.0, 0.5, 0.0, 0.25, 0.0])
    w = np.array([1.0, 2.0, 0.5, 1.0, 1.5])
    # the old normal interval, still available for comparison
    est = summarise(d, w, golden=0.9, confidence=0.9, bound=2.0, estimator="is",
                    interval="clt")
    t = w * d
    hw = 1.6448536269514722 * t.std(ddof=1) / math.sqrt(5)
    assert est.accuracy_drop == pytest.approx(t.mean()) and est.interval == "clt"
    assert est.half_width == pytest.approx(hw)
    assert est.ci == pytest.approx((0.9 - t.mean() - hw, 0.9 - t.mean() + hw))
    # ESS of the unbiased estimator: n * (mean(w d^2) - D^2) / (mean(t^2) - D^2)
    dm = t.mean()
    assert est.ess == pytest.approx(5 * (np.mean(w * d * d) - dm ** 2) / (np.mean(t * t) - dm ** 2))
    zero = summarise(np.zeros(100), np.ones(100), golden=0.8, confidence=0.95, interval="clt")
    assert zero.ra == 0.8 and zero.half_width == pytest.approx(-math.log(0.05) / 100)
    # the confidence sequence: point estimate unchanged, interval inside the drop's range
    cs = summarise(d, w, golden=0.9, confidence=0.9, bound=2.0)
    assert cs.interval == "betting-cs" and cs.accuracy_drop == pytest.approx(t.mean())
    assert 2.0 * (0.9 - 1) <= cs.drop_ci[0] < t.mean() < cs.drop_ci[1] <= 0.9
    assert cs.ci == pytest.approx((0.9 - cs.drop_ci[1], 0.9 - cs.drop_ci[0]))
    # no critical fault in 100 samples: the drop's upper end is honest, not 0
    none = summarise(np.zeros(100), np.ones(100), golden=0.8)
    assert none.ra == 0.8 and 0.01 < none.drop_ci[1] < 0.2 and none.ci[1] == pytest.approx(
        0.8 - none.drop_ci[0])
    with pytest.raises(ConfigError, match="--confidence"):
        summarise(d, w, 0.9, confidence=1.5)
    with pytest.raises(ConfigError, match="weight_bound"):
        summarise(d, w, 0.9, bound=1.0)  # a weight of 2 exceeds the stated bound


def test_bit_sensitivity_closed_form():
    b = bit_sensitivity("fp32")
    assert b[23:31].tolist() == [2.0 ** j for j in range(8)]
    assert b[31] == pytest.approx(math.log2(3)) and b[22] == pytest.approx(math.log2(1.5))
    assert bit_sensitivity("int8").tolist() == [2.0 ** k / 128 for k in range(7)] + [1.0]


def test_bad_estimator_settings(world):
    p, g = world["p"]["uniform"], world["ref"].golden_accuracy
    with pytest.raises(ConfigError, match="--max-samples"):
        estimate_ra(p, world["table"], g, max_samples=0)
    with pytest.raises(ConfigError, match="--alpha"):
        defensive(p, p, alpha=0.0)


def test_sampling_matches_probabilities_exactly_enumerated():
    rng = np.random.default_rng(0)
    shape = (3, 4)
    terms = [Term.const(shape, 1.0), Term.axis(shape, 1, np.array([0.0, 1.0, 5.0, 2.0])),
             Term(shape, np.array([[1.0, 4.0], [2.0, 0.5]]), [np.array([0, 1, 1]),
                                                              np.array([1, 0, 0, 1])])]
    d = SiteDistribution([Block("weight", "a", shape, np.array([1.0, 3.0]), terms),
                          Block("activation", "b", (2,), np.array([2.0, 2.0]),
                                [Term.full(np.array([1.0, 7.0]))])])
    sites, prob = d.enumerate()
    assert math.isclose(prob.sum(), 1.0)
    # independent reference: element weights computed by hand from the term definitions
    a = np.ones(shape) + np.array([0.0, 1.0, 5.0, 2.0])[None, :]
    a += np.array([[1.0, 4.0], [2.0, 0.5]])[np.array([0, 1, 1])][:, np.array([1, 0, 0, 1])]
    ref = np.concatenate([(a.reshape(-1, 1) * [1.0, 3.0]).ravel(),
                          (np.array([1.0, 7.0])[:, None] * [2.0, 2.0]).ravel()])
    assert np.allclose(prob, ref / ref.sum())
    n = 200_000
    s = d.sample(rng, n)
    flat = np.where(s.block == 0, s.index * 2 + s.bit, 24 + s.index * 2 + s.bit)
    freq = np.bincount(flat, minlength=28) / n
    assert np.all(np.abs(freq - prob) <= 5 * np.sqrt(prob * (1 - prob) / n) + 1e-12)
    assert np.allclose(d.prob(s), prob[flat])


def test_sites_round_trip_and_unknown_sites_have_zero_probability():
    d = build_exposure(nn.Linear(3, 2), torch.zeros(1, 3), "systolic", targets=("weight",))
    s = d.sample(np.random.default_rng(1), 10)
    back = Sites.from_records(s.records())
    assert np.allclose(d.prob(back), d.prob(s))
    other = Sites.from_records([("weight", "nope", 0, 0), ("activation", "", 0, 0)])
    assert d.prob(other).tolist() == [0.0, 0.0]


def test_per_site_weights_plug_in_exactly(world):
    """A per-site proposal (per-bit element arrays, e.g. a criticality predictor) samples
    and scores exactly ``P x weight`` and keeps IS unbiased."""
    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    rng = np.random.default_rng(5)
    table_w = {b.key: rng.random((32, b.numel)) for b in p.blocks}

    def weights(target, layer, bit, numel):
        return 3.0 if bit == 31 else None if bit < 20 else table_w[(target, layer)][bit]

    h = SiteWeightProposal(weights).heuristic(p, ProposalContext())
    sites, prob = p.enumerate()
    keys = [sites.keys[b] for b in sites.block]
    w = np.ones(len(sites))
    for j, (k, i, bit) in enumerate(zip(keys, sites.index, sites.bit, strict=True)):
        v = weights(*k, int(bit), 0)
        w[j] = 1.0 if v is None else v if np.ndim(v) == 0 else v[i]
    ref = prob * w / np.sum(prob * w)
    assert np.allclose(h.prob(sites), ref)
    n = 100_000
    s = h.sample(np.random.default_rng(1), n)
    flat = {k: i for i, k in enumerate(zip(keys, sites.index.tolist(), sites.bit.tolist(),
                                                      strict=True))}
    got = np.bincount([flat[(s.keys[b], i, t)] for b, i, t in
                       zip(s.block.tolist(), s.index.tolist(), s.bit.tolist(), strict=True)],
                      minlength=len(ref)) / n
    assert np.abs(got - ref).max() < 6 * np.sqrt(ref.max() / n)
    q = defensive(p, h, 0.3)
    drop = g - world["table"](sites)
    assert np.sum(q.prob(sites) * prob / q.prob(sites) * drop) == pytest.approx(
        np.sum(prob * drop), abs=1e-12)
    assert p.covers(h) and h.covers(p)


def _adaptive(world, alpha=0.2, start="bitfield", tune_alpha=False):
    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    ctx = ProposalContext(world["net"], world["x"], world["y"], "classification",
                          world["table"], g, "fp32", seed=0)
    return AdaptiveProposal(start=start, tune_alpha=tune_alpha).mixture(p, ctx, alpha)


@pytest.mark.parametrize("start", ["bitfield", "criticality"])
def test_adaptive_importance_sampling_is_unbiased_covers_and_bounded(world, start):
    """The proposal re-fitted after every batch (no pilot) keeps the plain IS mean unbiased
    (martingale) with P/q <= 1/alpha in every batch, covers the exhaustive RA at ~95 %, and
    its estimates vary less than plain MC's at the same sample count."""
    q = _adaptive(world, start=start)
    ratios: list[float] = []

    def record(_first, _sites, qq, pp, _acc):
        ratios.append(float((pp / qq).max()))

    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    est = estimate_ra(p, world["table"], g, q=q, target_margin=0.0, max_samples=1000,
                      batch=100, seed=0, weight_bound=5.0, record=record)
    assert len(ratios) == 10 and max(ratios) <= 5 + 1e-9 and q.updates == 10
    assert est.estimator == "is" and est.ess > 0
    # the fitted h puts its mass where the drop is (closed form: P_c x shrunk RMS)
    top = q.summary()["top_cells"]
    assert top and top[0]["h"] > 0 and top[0]["samples"] > 0
    ra_is = []
    cover = 0
    exact = world["exact"]["systolic"]
    for seed in range(SEEDS):
        e = estimate_ra(p, world["table"], g, q=q, target_margin=0.0, max_samples=1000,
                        batch=100, seed=seed, weight_bound=5.0)
        ra_is.append(e.ra)
        cover += e.ci[0] <= exact <= e.ci[1]
    ra_is = np.array(ra_is)
    assert abs(ra_is.mean() - exact) < 4 * ra_is.std(ddof=1) / math.sqrt(SEEDS)
    assert covers_at_least(cover, SEEDS), cover
    ra_mc, _, _, _ = _coverage(world, "systolic")
    assert ra_is.var(ddof=1) < 0.5 * ra_mc.var(ddof=1)


def test_adaptive_fit_closed_form(world):
    """With a start equal to P (so u = rho = 1 and w = P/q = 1), cell_rms is the
    hierarchical shrinkage E_P[d^2] -> bit group -> (target, group) -> (target, bit) -> cell
    of the mean squared drop, and h = P x r exactly."""
    p = world["p"]["systolic"]
    q = AdaptiveMixture(p, p, 0.2, kappa=1.0, keep_shape=False, tune_alpha=False)
    w0, w3, a0 = (p.keys.index(k) for k in (("weight", "0"), ("weight", "3"),
                                              ("activation", "0")))
    sites = Sites(p.keys, np.array([w0, w0, w3, w3, a0]), np.array([0, 1, 0, 0, 2]),
                  np.array([30, 30, 30, 3, 31]))
    q.update(sites, np.array([0.5, 0.0, 0.25, 0.0, -0.5]))
    r = q.cell_rms()
    # groups (fp32): sign {31}, top exponent {30}, other exponent 23..29, mantissa 0..22
    m0 = 0.5625 / 5  # mean of w d^2 (w = 1 here)
    m_top, m_sign, m_man = (0.3125 + m0) / (3 + 1), (0.25 + m0) / 2, m0 / 2
    m_w_top = (0.3125 + m_top) / (3 + 1)
    m_w30 = (0.3125 + m_w_top) / (3 + 1)
    assert r[w0, 30] == pytest.approx(math.sqrt((0.25 + m_w30) / (2 + 1)))
    assert r[w3, 30] == pytest.approx(math.sqrt((0.0625 + m_w30) / (1 + 1)))
    m_w_man = m_man / 2
    assert r[w3, 3] == pytest.approx(math.sqrt(m_w_man / 2 / 2))
    assert r[w0, 5] == pytest.approx(math.sqrt(m_w_man))  # unseen bit: (target, group)
    assert r[w0, 31] == pytest.approx(math.sqrt(m_sign))  # unseen for weights: the group
    m_a31 = (0.25 + (0.25 + m_sign) / 2) / 2
    assert r[a0, 31] == pytest.approx(math.sqrt((0.25 + m_a31) / 2))
    assert r[a0, 30] == pytest.approx(math.sqrt(m_top))
    assert r[w0, 25] == pytest.approx(math.sqrt(m0))  # nothing seen in the group
    every, prob = p.enumerate()
    ref = prob * r[every.block, every.bit]
    assert np.allclose(q.q.parts[1].prob(every), ref / ref.sum())
    assert np.allclose(q.prob(every), 0.2 * prob + 0.8 * ref / ref.sum())
    q.reset()
    assert q.updates == 0 and q.cell_rms().max() == 0


def test_adaptive_keeps_the_start_shape_inside_cells(world):
    """keep_shape: h_b = start rescaled per (tensor, bit) cell, so inside a cell h_b is
    proportional to the start heuristic and the cell masses are P_c x r_c."""
    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    rng = np.random.default_rng(2)
    table_w = {b.key: rng.random((32, b.numel)) + 0.1 for b in p.blocks}
    start = SiteWeightProposal(lambda t, layer, bit, n: table_w[(t, layer)][bit]).heuristic(
        p, ProposalContext())
    q = AdaptiveMixture(p, start, 0.2, tune_alpha=False)
    s = q.sample(np.random.default_rng(0), 300)
    q.update(s, g - world["table"](s))
    every, prob = p.enumerate()
    h, h0 = q.q.parts[1].prob(every), start.prob(every)
    cells = every.block * 32 + every.bit
    for c in np.unique(cells)[:: 7]:
        sel = cells == c
        if h[sel].sum() > 0:
            assert np.allclose(h[sel] / h[sel].sum(), h0[sel] / h0[sel].sum())
    pc = np.bincount(cells, weights=prob, minlength=cells.max() + 1)
    hc = np.bincount(cells, weights=h, minlength=cells.max() + 1)
    r = q.cell_rms().reshape(-1)[: hc.size]
    assert np.allclose(hc, pc * r / np.sum(pc * r))
    assert (prob / q.prob(every)).max() <= 5 + 1e-9


def test_adaptive_resume_is_deterministic(world, tmp_path):
    p, g, ref = world["p"]["systolic"], world["ref"].golden_accuracy, world["ref"]
    kw = {"target_margin": 0.0, "batch": 40, "seed": 3, "weight_bound": 5.0}
    store = RAStore(tmp_path / "ra.sqlite", {"model": "tiny"})
    store.open_stream("a", {})
    estimate_ra(p, CachedEvaluator(ref, store), g, q=_adaptive(world), max_samples=120,
                record=store.recorder("a"), **kw)
    ev = CachedEvaluator(ref, store)
    resumed = estimate_ra(p, ev, g, q=_adaptive(world), max_samples=200,
                          record=store.recorder("a"), **kw)
    fresh = estimate_ra(p, world["table"], g, q=_adaptive(world), max_samples=200, **kw)
    assert resumed.ra == fresh.ra and resumed.ci == fresh.ci and ev.injected <= 80
    store.close()


@pytest.mark.parametrize("start", ["bitfield", "criticality"])
def test_adaptive_weight_bound_is_exact_and_tuned_share_is_valid(world, start):
    """``weight_bound()`` equals ``max P/q_b`` over every enumerated site before each batch,
    and the defensive share picked from the samples stays >= alpha (so P/q_b <= 1/alpha)."""
    p, g = world["p"]["systolic"], world["ref"].golden_accuracy
    q = _adaptive(world, start=start, tune_alpha=True)
    every, prob = p.enumerate()
    rng = np.random.default_rng(3)
    shares = set()
    for _ in range(8):
        assert q.weight_bound() == pytest.approx(float((prob / q.prob(every)).max()), rel=1e-9)
        assert q.a >= 0.2 and q.weight_bound() <= 5 + 1e-9
        shares.add(q.a)
        s = q.sample(rng, 100)
        q.update(s, g - world["table"](s))
    assert q.alphas and min(q.alphas) >= 0.2
    # E_q[(P/q) d] = D exactly for the tuned proposal too (enumeration)
    drop = g - world["table"](every)
    assert np.sum(q.prob(every) * prob / q.prob(every) * drop) == pytest.approx(
        np.sum(prob * drop), abs=1e-12)
    assert q.summary()["alpha_now"] == q.a
