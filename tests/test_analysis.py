"""CFR tables: per-group stratified estimates against direct computations and a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.campaign.analysis import cfr_rows, cfr_table, parse_by
from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.stats import interval, t_value
from flipguard.campaign.store import CampaignStore
from flipguard.errors import ConfigError


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(12, 2))


def truth_table(seed: int = 0) -> dict[str, np.ndarray]:
    """Known criticality of every (element, bit) of the tiny net's weights."""
    rng = np.random.default_rng(seed)
    rate = np.full(32, 0.02)
    rate[23:31], rate[30], rate[31] = 0.1, 0.9, 0.3
    scale = {"0": 1.0, "2": 0.5}
    numel = {"0": 36, "2": 24}
    return {k: rng.random((numel[k], 32)) < rate * scale[k] for k in numel}


def records_from(faults, truth):
    return [(pf, "sdc-critical" if truth[pf.fault.layer][pf.fault.index, pf.fault.bits[0]]
             else "masked") for pf in faults]


def test_rows_by_layer_match_single_proportions():
    plan = make_plan(tiny_net(), PlanConfig(strata="layer", error=0.1, confidence=0.95))
    faults = plan.faults()
    rng = np.random.default_rng(1)
    classes = ["masked", "sdc-benign", "sdc-critical", "non-finite"]
    recs = [(pf, classes[int(rng.integers(4))]) for pf in faults]
    rows = cfr_rows(plan.strata, recs, ("layer",), 0.95, "clopper-pearson")
    assert [r["layer"] for r in rows] == ["0", "2"]
    for row, s in zip(rows, plan.strata, strict=True):
        mine = [c for pf, c in recs if pf.stratum == s.key]
        k = sum(c in ("sdc-critical", "non-finite") for c in mine)
        n, N, p = len(mine), s.N, k / len(mine)
        assert (row["n"], row["critical"], row["N"]) == (n, k, N)
        assert row["cfr"] == pytest.approx(p)
        assert row["ci"] == pytest.approx(list(interval(k, n, 0.95, "clopper-pearson", N=N)))
        assert row["margin"] == pytest.approx(
            t_value(0.95) * math.sqrt(p * (1 - p) / n * (N - n) / (N - 1)))
        assert row["masked"] == pytest.approx(mine.count("masked") / n)
        assert row["non_finite"] + row["sdc_critical"] == pytest.approx(p)


def test_network_and_bit_rows_are_stratified_combinations():
    plan = make_plan(tiny_net(), PlanConfig(strata="layer", error=0.1, confidence=0.95))
    faults = plan.faults()
    recs = records_from(faults, truth_table())
    (net,) = cfr_rows(plan.strata, recs, (), 0.95)
    Nt = sum(s.N for s in plan.strata)
    p_direct = var = 0.0
    for s in plan.strata:
        ks = [c == "sdc-critical" for pf, c in recs if pf.stratum == s.key]
        ph = np.mean(ks)
        p_direct += s.N / Nt * ph
        var += (s.N / Nt) ** 2 * (s.N - len(ks)) / (s.N - 1) * ph * (1 - ph) / len(ks)
    assert net["cfr"] == pytest.approx(p_direct) and net["N"] == Nt
    assert net["margin"] == pytest.approx(t_value(0.95) * math.sqrt(var))
    # by bit across layer strata: cells layer x bit with populations numel(layer)
    rows = {r["bit"]: r for r in cfr_rows(plan.strata, recs, ("bit",), 0.95)}
    assert list(rows)[:2] == sorted(rows, reverse=True)[:2]  # MSB first
    for bit, row in rows.items():
        cells = []
        for s in plan.strata:
            ks = [c == "sdc-critical" for pf, c in recs
                  if pf.stratum == s.key and pf.fault.bits[0] == bit]
            cells.append((s.elements, len(ks), sum(ks)))
        used = [c for c in cells if c[1]]
        Nu = sum(c[0] for c in used)
        assert row["N"] == sum(c[0] for c in cells)
        assert row["cfr"] == pytest.approx(sum(N / Nu * k / n for N, n, k in used))
        assert row["uncovered"] == pytest.approx(1 - Nu / row["N"])  # cells never drawn


@pytest.mark.parametrize(("strata", "by"), [("layer", ("layer",)), ("layer,bit", ()),
                                            ("layer,bit", ("field",)), ("network", ("layer",))])
def test_intervals_cover_the_exhaustive_truth(strata, by):
    net = tiny_net()
    truth = truth_table()
    conf = 0.9
    cover, total = {"wilson": 0, "clopper-pearson": 0}, 0
    for seed in range(60):
        plan = make_plan(net, PlanConfig(strata=strata, error=0.15, confidence=conf, seed=seed))
        recs = records_from(plan.faults(), truth)
        rows = {m: cfr_rows(plan.strata, recs, by, conf, method=m) for m in cover}
        for i, row in enumerate(rows["wilson"]):
            mask = {k: np.ones_like(v) for k, v in truth.items()}
            if "layer" in row:
                mask = {k: v * (k == row["layer"]) for k, v in mask.items()}
            if "field" in row:
                sel = {"sign": [31], "exponent": list(range(23, 31)),
                       "mantissa": list(range(23))}[row["field"]]
                for v in mask.values():
                    v[:, [b for b in range(32) if b not in sel]] = 0
            true = sum((truth[k] & (mask[k] > 0)).sum() for k in truth) / sum(
                (m > 0).sum() for m in mask.values())
            for m in cover:
                ci = rows[m][i]["ci"]
                cover[m] += ci[0] <= true <= ci[1]
            total += 1
    assert 0.8 <= cover["wilson"] / total <= 0.99
    assert 0.88 <= cover["clopper-pearson"] / total  # the exact default: never below nominal


def test_exhaustive_stratum_has_no_sampling_error():
    net = nn.Linear(2, 1, bias=False)
    plan = make_plan(net, PlanConfig(strata="layer", error=0.001, confidence=0.99))
    assert plan.strata[0].n == plan.strata[0].N == 64
    recs = [(pf, "sdc-critical" if pf.fault.bits[0] == 30 else "masked") for pf in plan.faults()]
    (row,) = cfr_rows(plan.strata, recs, ("layer",), 0.99)
    assert row["cfr"] == row["ci"][0] == row["ci"][1] == pytest.approx(2 / 64)
    assert row["margin"] == 0.0 and row["n_eff"] is None  # JSON-safe (no Infinity)


def test_parse_by_and_errors():
    assert parse_by("kernel,layer") == ("layer", "kernel")
    assert parse_by("network") == () and parse_by(None) == ()
    with pytest.raises(ConfigError, match="by:"):
        parse_by("layer,colour")
    plan = make_plan(tiny_net(), PlanConfig(strata="layer", error=0.3))
    with pytest.raises(ConfigError, match="method"):
        cfr_rows(plan.strata, [], ("layer",), 0.9, "bayes")


def test_cfr_table_reads_a_store(tmp_path):
    plan = make_plan(tiny_net(), PlanConfig(strata="layer,kernel", error=0.2, confidence=0.9))
    faults = plan.faults()
    store = CampaignStore.create(tmp_path / "campaign.sqlite",
                                 {"plan": plan.config.to_dict()}, plan.strata, faults)
    store.add_results([(pf.fault_id, {"critical": pf.fault.bits[0] >= 30}) for pf in faults])

    def classify(st, criterion):
        assert criterion == "any-flip"
        return [(pf, "sdc-critical" if d["critical"] else "masked") for pf, d in st.results()]

    rows = cfr_table(tmp_path / "campaign.sqlite", by="layer,kernel", criterion="any-flip",
                     classify=classify)
    assert [(r["layer"], r["kernel"]) for r in rows] == [("0", k) for k in range(4)] + [
        ("2", 0), ("2", 1)]
    for r, s in zip(rows, plan.strata, strict=True):
        crit = sum(pf.fault.bits[0] >= 30 for pf in faults if pf.stratum == s.key)
        assert (r["n"], r["critical"], r["N"]) == (s.n, crit, s.N)
    net_row = cfr_table(store, by=(), criterion="any-flip", classify=classify)[0]
    assert 0 < net_row["cfr"] < 0.2 and net_row["ci"][0] < net_row["cfr"] < net_row["ci"][1]


def test_partial_campaign_reports_the_uncovered_share():
    """Only layer 0 ran: the network row says which share of the population is unseen and its
    interval holds the true network CFR whether layer 2 is entirely critical or not at all."""
    plan = make_plan(tiny_net(), PlanConfig(strata="layer", error=0.1, confidence=0.95))
    truth = truth_table()
    recs = [r for r in records_from(plan.faults(), truth) if r[0].fault.layer == "0"]
    (layer0,) = cfr_rows(plan.strata, recs, ("layer",), 0.95)
    assert layer0["uncovered"] == 0.0
    (net,) = cfr_rows(plan.strata, recs, (), 0.95)
    N0, N2 = (s.N for s in plan.strata)
    assert net["N"] == N0 + N2 and net["n"] == layer0["n"]
    assert net["uncovered"] == pytest.approx(N2 / (N0 + N2))
    assert net["cfr"] == pytest.approx(layer0["cfr"])  # the sampled part, renormalised
    crit0 = truth["0"].sum()
    assert layer0["ci"][0] <= crit0 / N0 <= layer0["ci"][1]
    for crit2 in (0, N2):  # layer 2 all masked / all critical
        true = (crit0 + crit2) / (N0 + N2)
        assert net["ci"][0] <= true <= net["ci"][1], (crit2, true, net["ci"])
    assert math.isfinite(net["uncovered"]) and isinstance(net["uncovered"], float)
