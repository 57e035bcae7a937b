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
from flipguard.campaign.refine import top_up
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


# --- conventions that published numbers depend on (issue 14 §5) ----------------------------
# Ruospo et al., "Assessing Convolutional Neural Networks Reliability through Statistical Fault
# Injections", DATE 2023; artifact github.com/GabrieleGavarini/ExhaustiveFaultInjection,
# fault_injection/number_of_samples/<net>/{N_layers,n_date_per_layer,n_worst_case}.csv:
# per-layer populations N (weights x 32 bits x 2 stuck values: the no-op half included, see
# analysis/utils.py, which appends a NoChange=True copy of every flip as the other stuck-at),
# the per-layer Leveugle n and the per-layer-and-bit n (e = 1 %, 99 %, p = 0.5, t = 2.58,
# rounded to nearest; the artifact's own fault_injection.py uses `t=2.58`).
RESNET20_N = (27648, 147456, 147456, 147456, 147456, 147456, 147456, 294912, 589824, 589824,
              589824, 590464, 589824, 1179648, 2359296, 2359296, 2359296, 2359296, 2359296,
              40960)
RESNET20_N_LAYER = (10389, 14954, 14954, 14954, 14954, 14954, 14954, 15752, 16184, 16184, 16184,
                    16185, 16184, 16410, 16524, 16524, 16524, 16524, 16524, 11834)
RESNET20_N_BIT = (821, 3609, 3609, 3609, 3609, 3609, 3609, 5931, 8746, 8746, 8746, 8750, 8746,
                  11466, 13577, 13577, 13577, 13577, 13577, 1189)
MOBILENETV2_N = (55296, 65536, 18432, 32768, 98304, 55296, 147456, 221184, 82944, 221184, 221184,
                 82944, 294912, 393216, 110592, 393216, 393216, 110592, 393216, 393216, 110592,
                 786432, 1572864, 221184, 1572864, 1572864, 221184, 1572864, 1572864, 221184,
                 1572864, 1572864, 221184, 2359296, 3538944, 331776, 3538944, 3538944, 331776,
                 3538944, 3538944, 331776, 5898240, 9830400, 552960, 9830400, 9830400, 552960,
                 9830400, 9830400, 552960, 19660800, 26214400, 819200)
MOBILENETV2_N_LAYER = (12792, 13271, 8746, 11037, 14232, 12792, 14954, 15477, 13860, 15477,
                       15477, 13860, 15752, 15965, 14465, 15965, 15965, 14465, 15965, 15965,
                       14465, 16296, 16467, 15477, 16467, 16467, 15477, 16467, 16467, 15477,
                       16467, 16467, 15477, 16524, 16563, 15846, 16563, 16563, 15846, 16563,
                       16563, 15846, 16594, 16613, 16155, 16613, 16613, 16155, 16613, 16613,
                       16155, 16627, 16630, 16310)
MOBILENETV2_N_BIT = (1566, 1824, 557, 965, 2593, 1566, 3609, 4884, 2243, 4884, 4884, 2243, 5931,
                     7069, 2862, 7069, 7069, 2862, 7069, 7069, 2862, 9923, 12432, 4884, 12432,
                     12432, 4884, 12432, 12432, 4884, 12432, 12432, 4884, 13577, 14465, 6388,
                     14465, 14465, 6388, 14465, 14465, 6388, 15263, 15786, 8477, 15786, 15786,
                     8477, 15786, 15786, 8477, 16202, 16310, 10085)
PUBLISHED = {"resnet20": (RESNET20_N, RESNET20_N_LAYER, RESNET20_N_BIT),
             "mobilenetv2": (MOBILENETV2_N, MOBILENETV2_N_LAYER, MOBILENETV2_N_BIT)}


def _stand_in(populations) -> nn.Module:
    """One bias-free Linear per published layer with N / 64 weights (same stuck-at N)."""
    return nn.Sequential(*[nn.Linear(N // 64, 1, bias=False) for N in populations])


@pytest.mark.parametrize("net", sorted(PUBLISHED))
def test_table_t_reproduces_published_sample_sizes(net):
    """`--t table --rounding nearest --fault-model stuck-at` gives Ruospo et al.'s artifact
    sizes to the fault: per layer and per layer x bit (all 32 bits), for ResNet-20 and
    MobileNetV2; the exact t misses them (the conventions matter)."""
    N, per_layer, per_bit = PUBLISHED[net]
    model = _stand_in(N)
    cfg = dict(error=0.01, confidence=0.99, p=0.5, fault_model="stuck-at", rounding="nearest")
    layer = make_plan(model, PlanConfig(strata="layer", t="table", **cfg))
    assert tuple(s.N for s in layer.strata) == N
    assert tuple(s.n for s in layer.strata) == per_layer
    bit = make_plan(model, PlanConfig(strata="layer,bit", t="table", **cfg))
    got = {}
    for s in bit.strata:
        got.setdefault(s.layer, set()).add(s.n)
    assert tuple(got[str(i)] for i in range(len(N))) == tuple({n} for n in per_bit)
    exact = make_plan(model, PlanConfig(strata="layer", **cfg))  # every layer misses
    assert all(a.n < b for a, b in zip(exact.strata, per_layer, strict=True))


def test_table_t_by_hand_and_exact_default():
    """Hand formula with the printed t (1.96, 2.58; 1.64 at 90 %) and both roundings; the
    default stays the exact quantile and ceil."""
    def by_hand(N, e, t, rnd):
        raw = N / (1 + e * e * (N - 1) / (t * t * 0.25))
        return math.ceil(raw - 1e-9) if rnd == "ceil" else math.floor(raw + 0.5)

    net = nn.Linear(50, 20, bias=False)
    for conf, t in ((0.90, 1.64), (0.95, 1.96), (0.99, 2.58)):
        for rnd in ("ceil", "nearest"):
            cfg = PlanConfig(strata="layer,bit", error=0.02, confidence=conf, t="table",
                             rounding=rnd)
            assert cfg.t_value == t
            assert {s.n for s in make_plan(net, cfg).strata} == {by_hand(1000, 0.02, t, rnd)}
    default = PlanConfig(strata="layer", error=0.01, confidence=0.99)
    assert default.t == "exact" and default.t_value == pytest.approx(2.5758293035489)
    assert make_plan(net, default).strata[0].n == leveugle_n(32000, 0.01, 0.99)
    assert make_plan(net, default).strata[0].n == by_hand(32000, 0.01, 2.5758293035489, "ceil")
    assert by_hand(32000, 0.01, 2.58, "ceil") != by_hand(32000, 0.01, 2.5758293035489, "ceil")


def test_resnet20_stuck_at_population_is_the_artifacts():
    """The artifact's N is flipguard's default stuck-at population (no-op half included) of
    the CIFAR ResNet-20 weights (19 convs + fc), except layer 11, where the artifact has 10
    more weights than a 32x32x3x3 conv holds."""
    convs = [nn.Conv2d(3, 16, 3, bias=False)]
    convs += [nn.Conv2d(16, 16, 3, bias=False) for _ in range(6)]
    convs += [nn.Conv2d(16, 32, 3, bias=False)] + [nn.Conv2d(32, 32, 3, bias=False)
                                                   for _ in range(5)]
    convs += [nn.Conv2d(32, 64, 3, bias=False)] + [nn.Conv2d(64, 64, 3, bias=False)
                                                   for _ in range(5)]
    net = nn.Sequential(*convs, nn.Linear(64, 10, bias=False))
    plan = make_plan(net, PlanConfig(strata="layer", fault_model="stuck-at"))
    got = [s.N for s in plan.strata]
    assert [i for i, (a, b) in enumerate(zip(got, RESNET20_N, strict=True)) if a != b] == [11]
    assert RESNET20_N[11] - got[11] == 10 * 32 * 2


def _word(w: float) -> int:
    return struct.unpack("<I", struct.pack("<f", w))[0]


def _stuck_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 3, 2), nn.Flatten(), nn.Linear(12, 2))
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = 0.0  # an all-zero word: 32 effective stuck-at-1 only
        net[2].weight[1, 3] = -2.0
    return net


def test_effective_stuck_at_population_matches_struct_oracle():
    """Effective population per layer / bit / kernel / kind = a brute-force count over the
    weights' bits (struct); the default population keeps the no-op half (2 x sites)."""
    net = _stuck_net()
    weights = {"0": net[0].weight.detach().flatten().tolist(),
               "2": net[2].weight.detach().flatten().tolist()}
    per_kernel = {"0": 4, "2": 12}
    eff = make_plan(net, PlanConfig(strata="layer,bit", fault_model="stuck-at",
                                    stuck_at="effective", error=0.2))
    for s in eff.strata:
        ws = weights[s.layer]
        ones = [(_word(w) >> s.bit) & 1 for w in ws]
        changes = sum(1 for w in ws for v in (0, 1) if ((_word(w) >> s.bit) & 1) != v)
        assert s.N == changes == len(ws) and s.effective
        assert s.population_of(kind="stuck-at-0") == sum(ones)
        assert s.population_of(kind="stuck-at-1") == len(ws) - sum(ones)
        for c in range(len(ws) // per_kernel[s.layer]):
            sl = ones[c * per_kernel[s.layer]:(c + 1) * per_kernel[s.layer]]
            assert s.population_of(kernel=c, kind="stuck-at-0") == sum(sl)
    layer = make_plan(net, PlanConfig(strata="layer", fault_model="stuck-at",
                                      stuck_at="effective", error=0.2))
    assert [s.N for s in layer.strata] == [12 * 32, 24 * 32]
    assert layer.strata[0].population_of(bits=[31], kind="stuck-at-0") == sum(
        w < 0 or _word(w) >> 31 for w in weights["0"])
    default = make_plan(net, PlanConfig(strata="layer", fault_model="stuck-at", error=0.2))
    assert [s.N for s in default.strata] == [2 * 12 * 32, 2 * 24 * 32]
    assert not any(s.effective for s in default.strata)
    assert all(s.population_of(kind="stuck-at-0") == s.N // 2 for s in default.strata)


def test_effective_stuck_at_draws_no_noop_and_is_uniform():
    """No drawn effective fault is a no-op (struct oracle and `is_noop`), sizes follow the
    sites, and draws are uniform over the effective faults; the default draws no-ops too."""
    from flipguard.faults import is_noop

    net = _stuck_net()
    cfg = PlanConfig(strata="layer", fault_model="stuck-at", stuck_at="effective",
                     error=0.05, confidence=0.95, seed=4)
    plan = make_plan(net, cfg)
    assert [s.n for s in plan.strata] == [leveugle_n(s.sites, 0.05, 0.95) for s in plan.strata]
    w = {"0": net[0].weight.detach().flatten(), "2": net[2].weight.detach().flatten()}
    for pf in plan.faults():
        f = pf.fault
        bit = (_word(float(w[f.layer][f.index])) >> f.bits[0]) & 1
        assert f.kind == ("stuck-at-0" if bit else "stuck-at-1")
        assert not is_noop(w[f.layer][f.index], f)
    s = plan.strata[0]
    counts = np.zeros(s.N)
    for seed in range(200):
        drawn = draw_faults(plan.space, s, 48, seed, s.kinds)
        counts[[k for k, _, _ in drawn]] += 1
        assert len({(f.index, f.bits, f.kind) for _, f, _ in drawn}) == 48
    assert chisquare(counts).pvalue > 1e-3
    default = make_plan(net, PlanConfig(strata="layer", fault_model="stuck-at", error=0.05,
                                        confidence=0.95, seed=4))
    noops = [is_noop(w[pf.fault.layer][pf.fault.index], pf.fault) for pf in default.faults()]
    assert 0.3 < np.mean(noops) < 0.7


def test_effective_top_up_and_data_aware():
    """Top-ups of an effective stratum draw new effective faults only; the data-aware prior
    counts the same critical faults (no-ops never are) over half the population: twice the
    default's prior."""
    from flipguard.faults import is_noop

    net = _stuck_net()
    w = {"0": net[0].weight.detach().flatten(), "2": net[2].weight.detach().flatten()}
    base = dict(strata="layer", fault_model="stuck-at", error=0.1, confidence=0.9)
    plan = make_plan(net, PlanConfig(stuck_at="effective", p="data-aware", **base))
    first = plan.faults()
    done = {s.key: [pf.k for pf in first if pf.stratum == s.key] for s in plan.strata}
    new, sizes = top_up(plan, {s.key: (s.n, s.n // 2) for s in plan.strata}, done, 1, 10**6)
    assert len(new) == sum(sizes.values()) - len(first) > 0
    for pf in new:
        assert pf.k not in done[pf.stratum] and not is_noop(w[pf.fault.layer][pf.fault.index],
                                                            pf.fault)
    every = make_plan(net, PlanConfig(p="data-aware", **base))
    for a, b in zip(plan.strata, every.strata, strict=True):
        assert P_FLOOR < b.p < 2 * b.p < 1 - P_FLOOR  # unclamped in this net
        assert a.p == pytest.approx(2 * b.p) and a.N * 2 == b.N


def test_conventions_are_recorded_and_validated():
    table = PlanConfig(t="table", fault_model="stuck-at", stuck_at="effective")
    d = json.loads(json.dumps(table.to_dict()))
    assert d["t"] == "table" and d["stuck_at"] == "effective"
    assert PlanConfig.from_dict(d) == table
    assert "t" not in PlanConfig().to_dict() and "stuck_at" not in PlanConfig().to_dict()
    assert PlanConfig(t="table").digest() != PlanConfig().digest()
    assert PlanConfig(fault_model="stuck-at", stuck_at="effective").digest() != PlanConfig(
        fault_model="stuck-at").digest()
    s = make_plan(_stuck_net(), table).strata[0]
    assert PlannedStratum.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for kwargs, match in (({"t": "student"}, "t:"), ({"stuck_at": "half"}, "stuck-at:"),
                          ({"stuck_at": "effective"}, "needs --fault-model stuck-at"),
                          ({"t": "table", "confidence": 0.001}, "t:"),
                          ({"t": "table", "sampling": "stratified"}, "sampling")):
        with pytest.raises(ConfigError, match=match) as exc:
            PlanConfig(**kwargs)
        assert "\n" not in str(exc.value)
