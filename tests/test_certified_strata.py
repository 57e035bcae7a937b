"""Certified sub-strata: faults proven harmless are counted exactly, only the uncertified
remainder of each stratum is sampled, and the estimate stays valid for the whole population."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipguard.campaign.certified import CertifiedPredictor
from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.sequential import History, sequential_estimate
from flipguard.campaign.stratified import _known, stratify_plan
from flipguard.campaign.substrata import CERTIFIED
from flipguard.cli import app
from flipguard.errors import ConfigError
from flipguard.faults import Fault
from flipguard.inject import Engine, parse_criterion
from flipguard.inject.injector import faulty_value
from test_certify import _case


def _predictor(net, fmt_bits: int = 32):
    class P:
        def classes(self, layer, bit=None, kernel=None, bits=None, target=None,
                    kinds=("flip",)):
            numel = getattr(net.get_submodule(layer), target or "weight").numel()
            per = np.where(np.arange(fmt_bits) >= 23, 3, 0).astype(np.uint8)
            return np.repeat(per[None, :, None], numel, 0).repeat(len(kinds), 2).reshape(-1)
    return P()


@pytest.mark.parametrize(("name", "fmt"), [("cnn", "fp32"), ("cnn", "fp16"), ("cnn", "int8"),
                                           ("cae-msgms", "fp32")])
def test_certified_sites_agree_with_the_engine_and_change_no_decision(name, fmt):
    torch.set_num_threads(1)
    net, x, task = _case(name)
    eng = Engine(net, x, task, fmt=fmt, certify=True, batch_size=16).prepare()
    cert = eng.certifier
    bits = 32 if fmt == "fp32" else 16 if fmt in ("fp16", "bf16") else 8
    rng = np.random.default_rng(0)
    layers = [k for k in eng.program.calls if hasattr(net.get_submodule(k), "weight")]
    certified, sure_faults = 0, []
    for layer in layers:
        w = eng.model.get_submodule(layer).weight
        idx = rng.integers(0, w.numel(), 60)
        bit = rng.integers(0, bits, 60)
        got = cert.certified_sites(layer, "weight", idx, bit)
        for i, b, g in zip(idx.tolist(), bit.tolist(), got.tolist(), strict=True):
            f = Fault("weight", layer, i, (b,))
            old, new, _ = faulty_value(eng.model, f, eng._format(f))
            same = bool((old == new).item()) if torch.isfinite(new).item() else False
            assert g == (same or cert.certifies(f, old, new)), (layer, i, b)
            if g:
                sure_faults.append(f)
        certified += int(got.sum())
    assert certified > 0  # the test has teeth: some faults are certified
    sim = Engine(net, x, task, fmt=fmt, batch_size=16)
    crit = parse_criterion("any-flip")
    assert not any(crit.is_critical(o, sim.golden) for o in sim.run(sure_faults))


def test_plan_samples_only_the_uncertified_remainder_and_is_exact_on_census():
    torch.set_num_threads(1)
    net, x, task = _case("cnn")
    eng = Engine(net, x, task, certify=True, batch_size=16).prepare()
    pred = CertifiedPredictor(_predictor(eng.model), eng.certifier)
    cfg = PlanConfig(strata="layer", error=0.05, confidence=0.95, layers=("4", "7"),
                     sampling="stratified", exclude_certified=True)
    plan = stratify_plan(make_plan(eng.model, cfg), pred)
    cert_subs = [s for s in plan.strata if s.crit == CERTIFIED]
    assert cert_subs and all(s.n == 0 and s.N > 0 for s in cert_subs)
    d = plan.to_dict()
    assert d["certified_total"] == sum(s.N for s in cert_subs)
    for pf in plan.faults():
        f = pf.fault
        assert not pred.certified(f.layer, f.target, np.array([f.index]), np.array(f.bits))[0]
    # census of the whole population: the certified faults are never critical, and the
    # estimate from the remainder's census plus the certified count is the exact CFR
    crit = parse_criterion("any-flip")
    sim = Engine(net, x, task, batch_size=16)
    for s in plan.parents:
        numel = eng.model.get_submodule(s.layer).weight.numel()
        faults = [Fault("weight", s.layer, e, (b,)) for e in range(numel) for b in range(32)]
        bad = np.array([crit.is_critical(o, sim.golden) for o in sim.run(faults)])
        cls = plan.classes[s.key]
        assert not bad[cls == CERTIFIED].any()
        hists = [_known(int((cls == CERTIFIED).sum()))]
        for h in np.unique(cls[cls != CERTIFIED]).tolist():
            m = cls == h
            hists.append(History(int(m.sum()), int(m.sum()), int(bad[m].sum())))
        e = sequential_estimate(hists, 0.95, "clopper-pearson")
        assert e.p == pytest.approx(bad.mean()) and e.margin == pytest.approx(0.0, abs=1e-12)


def _coverage(certified: bool, R: int = 600, seed: int = 0) -> float:
    """Coverage of the stratum CFR interval when the certified share is a known census
    (``certified``) vs the broken rule that rates the stratum by its remainder alone."""
    rng = np.random.default_rng(seed)
    # a stratum of 20,000 faults: 70 % certified, a big near-harmless class with rare
    # critical faults, a small heavy class
    N_c, N_a, N_b, K_a, K_b = 14000, 5500, 500, 22, 310
    truth = (K_a + K_b) / (N_c + N_a + N_b)
    hit = 0
    for _ in range(R):
        hists = []
        for N, K, n in ((N_a, K_a, 400), (N_b, K_b, 80)):  # audit of 30, then one round
            drawn = rng.permutation(N)[:n] < K
            hists.append(History(N, 30, int(drawn[:30].sum()), (1,), (n - 30,),
                                 (int(drawn[30:].sum()),)))
        if certified:
            hists.insert(0, _known(N_c))
        e = sequential_estimate(hists, 0.95, "clopper-pearson")
        hit += e.ci[0] <= truth <= e.ci[1]
    return hit / R


def test_certified_census_keeps_coverage_and_the_broken_rule_fails():
    assert _coverage(True) >= 0.94
    assert _coverage(False) < 0.5


def test_campaign_excludes_certified_faults_end_to_end(tmp_path):
    from flipguard.campaign.store import CampaignStore
    from test_runner import make_tiny_run

    torch.set_num_threads(1)
    run = make_tiny_run(tmp_path)
    args = ["--strata", "layer", "--layers", "decoder.14,decoder.16", "--error", "0.1",
            "--confidence", "0.9", "--sampling", "stratified", "--images", "6",
            "--criterion", "any-flip"]
    cli = CliRunner()
    bad = cli.invoke(app, ["campaign", "plan", str(run), "--exclude-certified", "--probe",
                           "0", "--json"])
    assert bad.exit_code != 0 and "--sampling stratified" in bad.output
    res = cli.invoke(app, ["campaign", "plan", str(run), *args, "--exclude-certified",
                           "--probe", "0", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["certified_total"] > 0
    plain = json.loads(cli.invoke(app, ["campaign", "plan", str(run), *args, "--probe", "0",
                                        "--json"]).stdout)
    assert plain["certified_total"] == 0 and plan["population"] == plain["population"]
    res = cli.invoke(app, ["campaign", "run", str(run), *args, "--exclude-certified",
                           "--json"])
    assert res.exit_code == 0, res.output
    with CampaignStore(run / "campaign.sqlite") as store:
        strata = store.strata()
        cert = [s for s in strata if s.crit == CERTIFIED]
        assert cert and all(s.n == 0 for s in cert)
        assert sum(s.N for s in cert) == plan["certified_total"]
        ran = [pf.stratum for pf, _ in store.results()]
    assert ran and not any(k.endswith(f"crit={CERTIFIED}") for k in ran)
    rows = json.loads(cli.invoke(app, ["cfr", str(run), "--by", "layer", "--criterion",
                                       "any-flip", "--json"]).stdout)
    assert {r["layer"] for r in rows} == {"decoder.14", "decoder.16"}
    from flipguard.study.engines import RunEngineFactory

    net = RunEngineFactory(str(run)).model()
    done = {k: sum(1 for x in ran if x.startswith(f"weight:{k}:")) for k in
            ("decoder.14", "decoder.16")}
    for r in rows:  # each layer's CFR describes its whole population, certified part included
        assert r["N"] == net.get_submodule(r["layer"]).weight.numel() * 32
        assert r["n"] == done[r["layer"]]  # n: the simulated faults, not the certified ones
    assert all(0 <= r["ci"][0] <= r["cfr"] <= r["ci"][1] <= 1 for r in rows)
    out = cli.invoke(app, ["cfr", str(run), "--criterion", "auroc-drop:0.01"])
    assert out.exit_code != 0 and "decision criterion" in out.output
    assert cli.invoke(app, ["cfr", str(run), "--criterion", "accuracy-drop:0.05"]).exit_code == 0
    with pytest.raises(ConfigError, match="decision criterion"):
        from flipguard.study.predictors import predictor_for_factory

        predictor_for_factory(RunEngineFactory(str(run), images=6), PlanConfig(
            sampling="stratified", exclude_certified=True, criterion="auroc-drop:0.01"))


@pytest.mark.parametrize("name", ["cnn", "cae-msgms"])
def test_criterion_certificates_are_sound_and_certify_more(name):
    torch.set_num_threads(1)
    net, x, task = _case(name)
    eng = Engine(net, x, task, certify=True, batch_size=16).prepare()
    cert, crit = eng.certifier, parse_criterion("accuracy-drop:0.1")
    rng = np.random.default_rng(1)
    strict_n, extra = 0, []
    for layer in eng.program.calls:
        if not hasattr(net.get_submodule(layer), "weight"):
            continue
        w = eng.model.get_submodule(layer).weight
        assert (cert.certificate(layer).F >= cert.certificate(layer).T).all()
        idx, bit = rng.integers(0, w.numel(), 150), rng.integers(0, 32, 150)
        strict = cert.certified_sites(layer, "weight", idx, bit)
        loose = cert.certified_sites(layer, "weight", idx, bit, criterion=crit)
        assert not (strict & ~loose).any()  # proving no flip proves the criterion
        strict_n += int(strict.sum())
        extra += [Fault("weight", layer, int(i), (int(b),))
                  for i, b in zip(idx[loose & ~strict], bit[loose & ~strict], strict=True)]
    assert extra  # the criterion certifies faults that flip some borderline images
    sim = Engine(net, x, task, batch_size=16)
    outs = sim.run(extra)
    assert not any(crit.is_critical(o, sim.golden) for o in outs)


def test_a_store_whose_substrata_changed_is_refused():
    from dataclasses import replace

    from flipguard.campaign.stratified import _check_same_substrata

    torch.set_num_threads(1)
    net, x, task = _case("cnn")
    eng = Engine(net, x, task, certify=True, batch_size=16).prepare()
    cfg = PlanConfig(strata="layer", error=0.1, confidence=0.9, layers=("7",),
                     sampling="stratified", exclude_certified=True)
    plan = stratify_plan(make_plan(eng.model, cfg), CertifiedPredictor(_predictor(eng.model),
                                                                       eng.certifier))

    class Store:
        path = "campaign.sqlite"

        def __init__(self, strata):
            self._s = strata

        def strata(self):
            return self._s

    _check_same_substrata(plan, Store(list(plan.strata)))  # unchanged: accepted
    moved = [replace(s, N=s.N + 1) if s.crit == CERTIFIED else s for s in plan.strata]
    with pytest.raises(ConfigError, match="certificates changed"):
        _check_same_substrata(plan, Store(moved))


def test_what_each_criterion_tolerates_when_unproven_images_may_flip():
    from flipguard.inject import Golden

    g = Golden(kind="classification", n_images=100, accuracy=0.9)
    lost, changed = np.array([0, 0, 3, 4, 5]), np.array([0, 4, 4, 5, 5])
    assert parse_criterion("mismatch:0.05").tolerates(g, lost, changed).tolist() == \
        [True, True, True, False, False]  # 5 of 100 would reach 0.05: not tolerated
    assert parse_criterion("accuracy-drop:0.04").tolerates(g, lost, changed).tolist() == \
        [True, True, True, False, False]
    assert not parse_criterion("auroc-drop:0.5").tolerates(g, lost, changed).any()
    assert parse_criterion("any-flip").tolerates(g, lost, changed).tolist() == \
        [True, False, False, False, False]
    unknown = Golden(kind="classification", n_images=100)  # no accuracy: nothing may flip
    assert parse_criterion("accuracy-drop:0.5").tolerates(unknown, lost, changed).tolist() \
        == [True, False, False, False, False]
