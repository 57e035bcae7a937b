"""Criticality-stratified sampling against the exhaustively enumerated fault space of a tiny
detector: unbiasedness, coverage over repeated seeds (also with a wrong predictor), the
closed-form variance, the interval's closed forms, and the campaign integration."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flipguard.campaign.stats import interval, leveugle_n
from flipguard.campaign.substrata import (
    Cell,
    allocate,
    draw,
    estimate,
    neyman,
    predicted_margin,
    run_stratified,
    substratum_key,
)
from flipguard.criticality import CLASS_LABELS, Predictor
from flipguard.faults import Fault, SiteSpace
from flipguard.inject import DetectionTask, Engine, parse_criterion

CRIT = "accuracy-drop:0.01"


@pytest.fixture(scope="module")
def enumerated():
    """Exact outcome of every weight bit flip of a tiny AE (7,808 faults, Engine), the
    predictor's classes in stratum order, and a degraded predictor (30 % random classes)."""
    from flipguard.detect import ScoreConfig, Scorer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                        nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1), nn.Sigmoid()).eval()
    g = torch.Generator().manual_seed(1)
    x = nn.functional.interpolate(torch.rand(12, 1, 3, 3, generator=g), size=(8, 8),
                                  mode="bilinear")
    scorer = Scorer(ScoreConfig(map="l2", smooth_sigma=0, reduce="max"))
    with torch.no_grad():
        s = scorer.scores(x, net(x)).numpy()
    task = DetectionTask(scorer.scores, float(np.median(s)), (np.arange(12) % 3 == 0) * 1)
    eng = Engine(net, x, task, batch_size=12, fault_batch=32)
    crit = parse_criterion(CRIT)
    pred = Predictor.build(net, x, task, CRIT)
    rng = np.random.default_rng(7)
    out = {}
    for ls in SiteSpace(net).layers:
        j = np.arange(ls.population)
        faults = [Fault("weight", ls.name, int(e), (int(b),)) for e, b in zip(j // 32, j % 32,
                                                                              strict=True)]
        truth = np.array([crit.is_critical(o, eng.golden) for o in eng.run(faults)])
        good = pred.classes(ls.name)
        noisy = np.where(rng.random(good.size) < 0.3, rng.integers(0, 5, good.size), good)
        out[ls.name] = {"truth": truth, "good": good, "noisy": noisy,
                        "shuffled": rng.permutation(good), "rho": pred.rho(ls.name)[:, :, 0]}
    return out


def test_predictor_separates_the_enumerated_outcomes(enumerated):
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([d["truth"] for d in enumerated.values()])
    cls = np.concatenate([d["good"] for d in enumerated.values()])
    rho = np.concatenate([d["rho"].reshape(-1) for d in enumerated.values()])
    assert 0.01 < truth.mean() < 0.2
    rate = {CLASS_LABELS[h]: truth[cls == h].mean() for h in np.unique(cls)}
    assert rate["harmless"] <= 0.01 and rate["extreme"] >= 0.8
    assert (cls == 0).mean() > 0.5  # most faults are predictably harmless
    assert roc_auc_score(truth, np.minimum(rho, 1e300)) > 0.95


def test_fixed_allocation_unbiased_with_closed_form_variance(enumerated):
    d = enumerated["2"]
    truth, cls = d["truth"], d["noisy"]
    N = np.bincount(cls, minlength=5)
    n = np.minimum(N, [40, 15, 10, 10, 20])
    ests = []
    for seed in range(1500):
        cells = []
        for h in np.flatnonzero(N):
            _, j = draw(cls, h, int(n[h]), seed, f"s:{h}")
            cells.append((int(N[h]), int(n[h]), int(truth[j].sum())))
        ests.append(estimate(cells, 0.9).p)
    ests = np.array(ests)
    W = N / N.sum()
    p_h = np.array([truth[cls == h].mean() if N[h] else 0.0 for h in range(5)])
    S2 = np.where(N > 1, N * p_h * (1 - p_h) / np.maximum(N - 1, 1), 0.0)
    var = float((W ** 2 * (1 - n / np.maximum(N, 1)) * S2 / np.maximum(n, 1)).sum())
    assert abs(ests.mean() - truth.mean()) < 4 * np.sqrt(var / len(ests))
    assert 0.85 < ests.var() / var < 1.15


@pytest.mark.parametrize("layer", ["2", "4"])
def test_two_phase_is_unbiased_and_covers_also_with_a_wrong_predictor(enumerated, layer):
    d, conf, R = enumerated[layer], 0.9, 120
    p = d["truth"].mean()
    for name in ("good", "noisy", "shuffled"):
        res = [run_stratified(d[name], lambda j: d["truth"][j], error=0.03, confidence=conf,
                              seed=s, key=layer) for s in range(R)]
        est = np.array([r.estimate.p for r in res])
        cover = np.mean([r.estimate.ci[0] <= p <= r.estimate.ci[1] for r in res])
        assert abs(est.mean() - p) <= 4 * est.std() / np.sqrt(R) + 1e-12, name
        assert cover >= conf - 2.5 * np.sqrt(conf * (1 - conf) / R), (name, cover)
        for r in res:  # every sub-stratum audited; the draws are within the classes
            assert all(a >= min(N, 30) for N, a in zip(r.N, r.n0, strict=True))
            assert all(d[name][r.drawn[h]].tolist() == [h] * len(r.drawn[h]) for h in r.drawn)


def test_sequential_reaches_the_margin_and_a_wrong_predictor_costs_samples(enumerated):
    d, conf, err, R = enumerated["2"], 0.95, 0.02, 80
    p = d["truth"].mean()
    total = {}
    for name in ("good", "noisy", "shuffled"):
        res = [run_stratified(d[name], lambda j: d["truth"][j], error=err, confidence=conf,
                              seed=s, key="2", sequential=True) for s in range(R)]
        margin = np.array([r.estimate.margin for r in res])
        if name != "shuffled":  # a predictor off by 16x in its prior may miss the margin
            assert (margin <= err).all(), (name, margin.max())
        assert margin.max() <= 1.5 * err and np.mean(margin <= err) >= 0.6
        cover = np.mean([r.estimate.ci[0] <= p <= r.estimate.ci[1] for r in res])
        assert cover >= conf - 2.5 * np.sqrt(conf * (1 - conf) / R), (name, cover)
        assert all(r.rounds >= 2 for r in res)  # allocation, then at least a closing round
        total[name] = np.mean([r.total for r in res])
    uniform = leveugle_n(d["truth"].size, err, conf)
    assert total["good"] < 0.5 * uniform and total["shuffled"] > 1.3 * total["good"]


def test_draw_is_seeded_uniform_and_without_replacement():
    cls = np.tile(np.arange(3), 40)  # class 1: every third fault
    k1, j1 = draw(cls, 1, 25, seed=4, key="a")
    k2, j2 = draw(cls, 1, 25, seed=4, key="a")
    assert np.array_equal(j1, j2) and (cls[j1] == 1).all() and len(set(j1.tolist())) == 25
    k3, j3 = draw(cls, 1, 15, seed=4, key="a", round_=1, exclude=k1)
    assert not set(j3.tolist()) & set(j1.tolist()) and len(set(j1) | set(j3)) == 40
    assert not np.array_equal(draw(cls, 1, 25, seed=5, key="a")[1], j1)
    hits = np.bincount(np.concatenate([draw(cls, 2, 1, s, "u")[1] for s in range(4000)]),
                       minlength=120)[2::3]
    assert np.abs(hits - 100).max() < 4.5 * np.sqrt(100)
    with pytest.raises(Exception, match="n: expected 0..40"):
        draw(cls, 0, 41, 0, "x")


def test_interval_closed_forms():
    one = estimate([(500, 50, 7)], 0.95)
    assert one.p == 7 / 50
    assert np.allclose(one.ci, interval(7, 50, 0.95, "clopper-pearson", 500, exact_fpc=False))
    assert np.allclose(estimate([(50, 50, 7), (30, 30, 0)], 0.9).ci, 7 / 80, rtol=0, atol=1e-15)
    c = Cell(100, 10, 2, 20, 5)
    e = estimate([c], 0.95)
    lo, hi = interval(2, 10, 0.95, "clopper-pearson", 80, exact_fpc=False)
    assert np.isclose(e.p, 0.21) and np.allclose(e.ci, [(5 + 80 * lo) / 100,
                                                        (5 + 80 * hi) / 100])
    assert np.allclose(estimate([Cell(100, 0, 0, 20, 5)], 0.9).ci, [0.05, 0.85])
    a, b = (1000, 40, 0), (200, 40, 10)  # MOVER by hand
    la, ua = interval(0, 40, 0.9, "clopper-pearson", 1000, exact_fpc=False)
    lb, ub = interval(10, 40, 0.9, "clopper-pearson", 200, exact_fpc=False)
    wa, wb = 1000 / 1200, 200 / 1200
    pt = wb * 0.25
    e = estimate([a, b], 0.9)
    assert np.isclose(e.p, pt) and e.ci[0] > 0
    assert np.isclose(e.ci[1], pt + np.hypot(wa * ua, wb * (ub - 0.25)))
    assert np.isclose(e.ci[0], pt - np.hypot(0.0, wb * (0.25 - lb)))
    assert neyman(100, [1000, 3000], [0.5, 0.5]).tolist() == [25, 75]
    assert neyman(100, [1000, 1000, 1000], [0.5, 0.0, 0.5], minimum=10).tolist() == [45, 10, 45]
    n = allocate([20000, 3000, 100, 700], [0.002, 0.02, 0.3, 0.95], 0.01, 0.99,
                 n0=[30, 30, 30, 30])
    assert predicted_margin([20000, 3000, 100, 700], n, [0.002, 0.02, 0.3, 0.95], 0.99,
                            n0=[30] * 4) <= 0.01
    assert n.min() >= 30 and n.argmax() == 0 and n.sum() < leveugle_n(23800, 0.01, 0.99) / 5
    tighter = allocate([20000, 3000, 100, 700], [0.002, 0.02, 0.3, 0.95], 0.005, 0.99,
                       n0=[30, 30, 30, 30])
    assert (tighter >= n).all() and tighter.sum() > n.sum()


def test_a_perfect_predictor_still_needs_the_zero_event_bound_unless_faults_are_certified():
    """A class predicted and truly 0 % critical must bound its unseen rate: 0 of n gives the
    Clopper-Pearson upper limit 1 - (alpha/2)^(1/n), so at e = 1 %, 99 % no plan of a layer
    draws fewer than ln(0.005) / ln(0.99) = 527.2 faults (BENCHMARKS §12's floor); counting
    certified faults exactly is what shrinks it: with a share c certified, the rest bounds its
rate to e / (1 - c)."""
    N, e, conf = 1_000_000, 0.01, 0.99
    bound = math.log((1 - conf) / 2) / math.log(1 - e)
    pure = allocate([N], [0.0], e, conf)
    assert bound <= pure.sum() <= 1.1 * bound + 1
    assert predicted_margin([N], pure, [0.0], conf) <= e
    assert predicted_margin([N], [int(0.98 * bound)], [0.0], conf) > e  # the bound is sharp
    split = allocate([900_000, 100_000], [0.0, 1.0], e, conf)  # perfect 0 % / 100 % classes
    assert bound <= split.sum() <= 1.1 * bound + 31
    for certified in (0.3, 0.5, 0.9):  # a certified sub-stratum is known: n = N
        C = int(certified * N)
        n = allocate([C, N - C], [0.0, 0.0], e, conf, have=[C, 0])
        assert n[0] == C and predicted_margin([C, N - C], n, [0.0, 0.0], conf) <= e
        need = math.log((1 - conf) / 2) / math.log(1 - e / (1 - certified))
        assert need <= n[1] <= 1.1 * need + 31 and n[1] < (1 - certified / 2) * bound


def test_stratified_campaign_end_to_end(tmp_path):
    from flipguard.campaign.analysis import CRITICAL, cfr_table, classify_store
    from flipguard.campaign.planner import PlanConfig
    from flipguard.campaign.runner import open_campaign
    from flipguard.campaign.store import CampaignStore
    from flipguard.campaign.stratified import substrata_estimate
    from flipguard.cli import app
    from flipguard.study.engines import RunEngineFactory
    from flipguard.study.predictors import calibration_table, predictor_for_factory
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    args = ["--layers", "encoder.0", "--target-margin", "0.05", "--confidence",
            "0.95", "--sampling", "stratified", "--images", "6"]
    cli = CliRunner()
    res = cli.invoke(app, ["campaign", "plan", str(run), *args, "--probe", "0", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["sampling"] == "stratified" and len(plan["parents"]) == 1
    assert plan["uniform_total"] == leveugle_n(64 * 32, 0.05, 0.95)
    for par in plan["parents"]:
        subs = [s for s in plan["strata"] if s["parent"] == par["key"]]
        assert sum(s["N"] for s in subs) == par["N"] == 64 * 32
        assert all(s["n"] == min(s["N"], 30) for s in subs)
    res = cli.invoke(app, ["campaign", "run", str(run), *args, "--json"])
    assert res.exit_code == 0, res.output
    with CampaignStore(run / "campaign.sqlite") as store:  # allocation, top-ups, closing
        assert 2 <= store.get_meta("rounds") <= 4 and store.counts()["planned"] > plan["total"]
        assert store.get_meta("closed") == ["weight:encoder.0"]
        first = [(pf.stratum, pf.k, pf.fault) for pf in store.planned() if pf.round == 0]
        records = classify_store(store, CRIT)
        calib = store.get_meta("calibration")
    audit: dict[str, list[int]] = {}  # the class rates allocation planned with: the audit
    for pf, cls in records:
        if pf.round == 0:
            v = audit.setdefault(pf.stratum.rsplit("crit=", 1)[1], [0, 0])
            v[0] += 1
            v[1] += cls in CRITICAL
    labels = ("harmless", "low", "borderline", "critical", "extreme")
    assert calib and {labels[int(h)] for h in audit} == set(calib)
    for h, (n, k) in audit.items():
        c = calib[labels[int(h)]]
        assert (c["audited"], c["critical"]) == (n, k)
        assert c["rate"] == pytest.approx((k + 0.5) / (n + 1))
    cfg = PlanConfig(strata="layer", error=0.05, confidence=0.95, layers=("encoder.0",),
                     sampling="stratified")
    factory = RunEngineFactory(str(run), images=6)
    predictor = predictor_for_factory(factory, cfg)
    with open_campaign(run, cfg, factory, path=tmp_path / "again.sqlite",
                       predictor=predictor) as again:
        assert [(pf.stratum, pf.k, pf.fault) for pf in again.planned()] == first
    rows = cfr_table(run, by="layer", criterion=CRIT)
    engine = factory()
    crit = parse_criterion(CRIT)
    faults = [Fault("weight", "encoder.0", e, (b,)) for e in range(64) for b in range(32)]
    exact = np.mean([crit.is_critical(o, engine.golden) for o in engine.run(faults)])
    for row in rows:  # the exact CFR of the layer, by enumerating it
        assert row["sampling"] == "stratified" and row["N"] == 2048
        assert row["ci"][0] <= exact <= row["ci"][1]
    with CampaignStore(run / "campaign.sqlite") as store:  # the estimator across the rounds
        strata = store.strata()
    by_round: dict = {}
    for pf, cls in records:
        by_round.setdefault(pf.stratum, {}).setdefault(pf.round, Counter())[cls] += 1
    e = substrata_estimate([(s, s.N) for s in strata], None, None, CRITICAL, 0.95, by_round)
    assert e.ci[0] <= exact <= e.ci[1] and e.margin <= 0.05 + 1e-9 and e.n == rows[0]["n"]
    cal = calibration_table(run, CRIT)
    assert sum(r["n"] for r in cal) == sum(r["n"] for r in rows)
    assert substratum_key("weight:encoder.0", 4) in {s["key"] for s in plan["strata"]}
