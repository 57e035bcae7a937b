"""Planner: populations, Leveugle sizes per stratum, seeded uniform sampling, priors, top-ups."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from flipguard.campaign.planner import (
    P_FLOOR,
    PlanConfig,
    PlannedStratum,
    draw_faults,
    make_plan,
)
from flipguard.campaign.runner import top_up
from flipguard.campaign.stats import leveugle_n
from flipguard.errors import ConfigError


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 3, 2),
                         nn.Flatten(), nn.Linear(12, 2))


def cochran(N, e, t, p=0.5):
    n0 = t * t * p * (1 - p) / (e * e)
    return n0 * N / (N + n0 - 1)


def test_layer_strata_population_and_sizes():
    net = tiny_net()
    plan = make_plan(net, PlanConfig(strata="layer", error=0.05, confidence=0.95))
    numels = {"0": 36, "2": 48, "4": 24}  # weights only by default
    assert [s.layer for s in plan.strata] == ["0", "2", "4"]
    for s in plan.strata:
        assert s.N == numels[s.layer] * 32
        assert s.n == math.ceil(cochran(s.N, 0.05, 1.959964))
    assert plan.population == 108 * 32 and plan.total == sum(s.n for s in plan.strata)
    both = make_plan(net, PlanConfig(strata="layer", error=0.05, targets=("weight", "bias")))
    assert both.population == (108 + 4 + 3 + 2) * 32
    stuck = make_plan(net, PlanConfig(strata="layer", error=0.05, fault_model="stuck-at"))
    assert stuck.population == 2 * plan.population


def test_network_strata_allocation():
    net = tiny_net()
    plan = make_plan(net, PlanConfig(strata="network", error=0.03, confidence=0.99))
    n = leveugle_n(plan.population, 0.03, 0.99)
    assert plan.total == n
    for s in plan.strata:
        assert abs(s.n - n * s.N / plan.population) < 1


def test_bit_and_kernel_strata():
    net = tiny_net()
    plan = make_plan(net, PlanConfig(strata="layer,bit", error=0.1, confidence=0.9))
    assert len(plan.strata) == 3 * 32
    assert all(s.N == {"0": 36, "2": 48, "4": 24}[s.layer] for s in plan.strata)
    faults = plan.faults()
    assert all(pf.fault.bits == (int(pf.stratum.split("bit=")[1]),) for pf in faults)
    kern = make_plan(net, PlanConfig(strata="layer,kernel", error=0.1, confidence=0.9))
    # default: the first and last target layers only; kernel = output-channel filter
    assert sorted({s.layer for s in kern.strata}) == ["0", "4"]
    assert [s.N for s in kern.strata] == [9 * 32] * 4 + [12 * 32] * 2
    for pf in kern.faults():
        assert pf.kernel == int(pf.stratum.split("kernel=")[1])
        assert pf.fault.index // (9 if pf.fault.layer == "0" else 12) == pf.kernel
    ct = make_plan(net, PlanConfig(strata="layer,kernel", error=0.1, layers=("2",)))
    w = net[2].weight  # (in=4, out=3, 2, 2): kernel = axis 1
    for pf in ct.faults():
        assert np.unravel_index(pf.fault.index, tuple(w.shape))[1] == pf.kernel


def test_same_seed_same_faults_and_independent_strata():
    net = tiny_net()
    cfg = PlanConfig(strata="layer,bit", error=0.2, confidence=0.9, seed=7)
    a, b = make_plan(net, cfg).faults(), make_plan(net, cfg).faults()
    assert a == b
    other = make_plan(net, PlanConfig(strata="layer,bit", error=0.2, confidence=0.9, seed=8))
    assert [f.fault for f in other.faults()] != [f.fault for f in a]
    only = make_plan(net, PlanConfig(strata="layer,bit", error=0.2, confidence=0.9, seed=7,
                                     layers=("2",)))
    sub = [(f.stratum, f.fault) for f in a if f.fault.layer == "2"]
    assert [(f.stratum, f.fault) for f in only.faults()] == sub
    sites = [(f.fault.layer, f.fault.index, f.fault.bits, f.fault.kind) for f in a]
    assert len(set(sites)) == len(sites)  # without replacement


def test_sampling_is_uniform_within_a_stratum():
    net = nn.Linear(4, 2, bias=False)
    s = make_plan(net, PlanConfig(strata="layer", fault_model="stuck-at")).strata[0]
    assert s.N == 8 * 32 * 2
    counts = np.zeros(s.N)
    elem = np.zeros(8)
    bits = np.zeros(32)
    space = make_plan(net, PlanConfig()).space
    for seed in range(300):
        drawn = draw_faults(space, s, 64, seed, s.kinds)
        ks = [k for k, _, _ in drawn]
        assert len(set(ks)) == 64
        counts[ks] += 1
        for _, f, _ in drawn:
            elem[f.index] += 1
            bits[f.bits[0]] += 1
    assert chisquare(counts).pvalue > 1e-3
    assert chisquare(elem).pvalue > 1e-3 and chisquare(bits).pvalue > 1e-3


def _flip(w: float, bit: int) -> float:
    (i,) = struct.unpack("<I", struct.pack("<f", w))
    return struct.unpack("<f", struct.pack("<I", i ^ (1 << bit)))[0]


def test_data_aware_prior_matches_struct_oracle():
    net = nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -0.25, 0.1, 1.5, -0.03]] * 3) * torch.tensor(
            [[1.0], [0.5], [2.0]]))
    w = net.weight.detach().flatten().tolist()
    limit = max(abs(x) for x in w)

    def crit(x, b):
        y = _flip(x, b)
        return not math.isfinite(y) or abs(y - x) > limit

    plan = make_plan(net, PlanConfig(strata="layer,bit", p="data-aware", error=0.05))
    for s in plan.strata:
        expected = sum(crit(x, s.bit) for x in w) / len(w)
        assert s.p == pytest.approx(min(max(expected, P_FLOOR), 1 - P_FLOOR))
        assert s.n == leveugle_n(s.N, 0.05, 0.99, s.p)
    layer = make_plan(net, PlanConfig(strata="layer", p="data-aware")).strata[0]
    total = sum(crit(x, b) for x in w for b in range(32)) / (32 * len(w))
    assert layer.p == pytest.approx(max(total, P_FLOOR))
    assert make_plan(net, PlanConfig(strata="layer", p=0.5)).strata[0].n > layer.n


def test_top_up_draws_only_new_faults():
    net = tiny_net()
    plan = make_plan(net, PlanConfig(strata="layer", p="data-aware", error=0.05,
                                     confidence=0.95))
    first = plan.faults()
    done = {}
    for pf in first:
        done.setdefault(pf.stratum, []).append(pf.k)
    observed = {s.key: (s.n, s.n // 2) for s in plan.strata}  # p_hat = 0.5
    new, sizes = top_up(plan, observed, done, 1, len(first))
    for s in plan.strata:
        assert sizes[s.key] == leveugle_n(s.N, 0.05, 0.95, 0.5)
        added = [pf for pf in new if pf.stratum == s.key]
        assert len(added) == sizes[s.key] - s.n
        assert not {pf.k for pf in added} & set(done[s.key])
    assert [pf.fault_id for pf in new] == list(range(len(first), len(first) + len(new)))
    again, _ = top_up(plan, observed, done, 1, len(first))
    assert again == new  # reproducible
    low = {s.key: (s.n, 0) for s in plan.strata}
    assert top_up(plan, low, done, 1, len(first))[0] == []  # never shrinks or re-runs


def test_user_strata(tmp_path):
    net = tiny_net()
    items = [{"layer": "0", "bits": "exponent"}, {"layer": "0", "bit": 31, "n": 5},
             {"layer": "4", "kernel": 1}]
    plan = make_plan(net, PlanConfig(user_strata=tuple(items), error=0.1))
    assert [s.N for s in plan.strata] == [36 * 8, 36, 12 * 32]
    assert plan.strata[1].n == 5
    json.dumps(plan.to_dict())
    with pytest.raises(ConfigError, match="overlaps"):
        make_plan(net, PlanConfig(user_strata=({"layer": "0"}, {"layer": "0", "bit": 3})))
    with pytest.raises(ConfigError, match=r"strata\[0\]"):
        make_plan(net, PlanConfig(user_strata=({"layr": "0"},)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"error": 0.0}, "error"), ({"error": 1.2}, "error"), ({"confidence": 1.0}, "confidence"),
     ({"p": 0.0}, "p:"), ({"p": "bogus"}, "p:"), ({"strata": "layer,foo"}, "strata"),
     ({"fault_model": "x"}, "fault-model"), ({"rounding": "up"}, "rounding"),
     ({"targets": ("activation",)}, "targets")],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ConfigError, match=match) as exc:
        PlanConfig(**kwargs)
    assert "\n" not in str(exc.value)


def test_unknown_layer_and_roundtrip():
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        make_plan(tiny_net(), PlanConfig(layers=("nope",)))
    cfg = PlanConfig(strata="layer,bit", p="data-aware", layers=("0", "4"), seed=3)
    assert PlanConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.digest() != PlanConfig(strata="layer,bit").digest()
    s = make_plan(tiny_net(), cfg).strata[0]
    assert PlannedStratum.from_dict(json.loads(json.dumps(s.to_dict()))) == s
