"""Hardening planner: budget respected, brute-force optimality, coverage vs struct oracles."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch
from torch import nn

from flipguard.errors import ConfigError
from flipguard.harden.mechanisms import Protection
from flipguard.harden.planner import (
    Candidate,
    candidates,
    improvement_curve,
    objective,
    parse_schemes,
    plan_hardening,
    select,
    weight_bits,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.linspace(-1.5, 1.2, p.numel()).reshape(p.shape))
    return net


def rows_for(net: nn.Module, cfr: dict[int, float], kernels: bool = False) -> list[dict]:
    rows = []
    for layer in ("0", "2"):
        w = net.get_submodule(layer).weight
        ks = range(w.shape[0]) if kernels else [None]
        for k in ks:
            n = w[0].numel() if kernels else w.numel()
            for b in range(32):
                row = {"layer": layer, "target": "weight", "bit": b, "N": n,
                       "cfr": cfr.get(b, 0.0) * (1.0 + (k or 0) * 0.1)}
                if kernels:
                    row["kernel"] = k
                rows.append(row)
    return rows


CFR = {30: 0.9, 29: 0.2, 28: 0.05, 31: 0.01, 22: 0.002}


def u32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32(w: int) -> float:
    return struct.unpack("<f", struct.pack("<I", w & 0xFFFFFFFF))[0]


def test_candidates_coverage_and_costs() -> None:
    net = tiny_model()
    cands = candidates(net, rows_for(net, CFR), "fp32")
    by = {(c.protection.scheme, c.protection.layer, c.protection.bits): c for c in cands}
    inv = next(c for c in cands if c.protection.scheme == "invariant"
               and c.protection.layer == "0")
    assert 30 in inv.protection.bits and inv.cost == 0  # |w| < 2: exponent MSB is always 0
    w0 = net[0].weight.detach().reshape(-1).tolist()
    for b in range(32):  # invariant bits are exactly those constant over the layer
        const = len({u32(v) >> b & 1 for v in w0}) == 1
        assert (b in inv.protection.bits) == const
    tmr = by[("tmr", "0", (29,))]
    assert tmr.cost == 2 * 24 and tmr.coverage == {("0", "weight", None, 29): 1.0}
    ecc = next(c for c in cands if c.protection.scheme == "ecc" and c.protection.layer == "2")
    assert ecc.cost == 7 * 12
    par = next(c for c in cands if c.protection.scheme == "parity" and c.protection.layer == "0")
    assert par.cost == 24 and set(par.protection.bits) == set(CFR)
    rng = next(c for c in cands if c.protection.scheme == "range" and c.protection.layer == "0")
    assert rng.cost == 64 and (rng.protection.lo, rng.protection.hi) == (min(w0), max(w0))
    for key, frac in rng.coverage.items():  # struct oracle: flipped value out of range or NaN
        b = key[3]
        flipped = [f32(u32(v) ^ (1 << b)) for v in w0]
        out = sum(1 for x in flipped if x != x or x < min(w0) or x > max(w0))
        assert frac == pytest.approx(out / len(w0))


@pytest.mark.parametrize("budget", [0.0, 0.005, 0.02, 0.03, 0.1, 0.5])
def test_budget_respected(budget: float) -> None:
    net = tiny_model()
    plan = plan_hardening(net, rows_for(net, CFR), budget=budget)
    total = weight_bits(net)
    assert total == sum(p.numel() for p in net.parameters()) * 32
    assert plan.cost_bits <= budget * total and plan.overhead <= budget
    assert plan.cost_bits == sum(r["cost_bits"] for r in plan.table)
    cum = [r["cumulative_bits"] for r in plan.table]
    assert cum == sorted(cum) and (not cum or cum[-1] == plan.cost_bits)
    if budget == 0.0:
        assert {p.scheme for p in plan.protections} <= {"invariant"}
    # gains in the table add up to the objective of the chosen set
    weights = {("0" if r["layer"] == "0" else "2", "weight", None, r["bit"]): r["N"] * r["cfr"]
               for r in rows_for(net, CFR)}
    assert sum(r["expected_gain"] for r in plan.table) == pytest.approx(plan.expected_removed)
    cands = {c.protection: c for c in candidates(net, rows_for(net, CFR))}
    assert objective([cands[p] for p in plan.protections], weights) == \
        pytest.approx(plan.expected_removed)


def test_layer_invariants_taken_without_observed_critical_faults() -> None:
    """A sampled campaign may see no critical fault in a layer's invariant bits; the free,
    exact invariant is still taken (a held-out sample would hit those bits)."""
    net = tiny_model()
    rows = [r for r in rows_for(net, CFR) if r["layer"] == "0"]
    rows += [{**r, "cfr": 0.0} for r in rows_for(net, CFR) if r["layer"] == "2"]
    for method in ("greedy", "exact"):
        plan = plan_hardening(net, rows, budget=0.0, method=method)
        inv = {p.layer: p for p in plan.protections if p.scheme == "invariant"}
        assert set(inv) == {"0", "2"}, method
        w2 = net[2].weight.detach().reshape(-1).tolist()
        assert 30 in inv["2"].bits and all(u32(v) >> 30 & 1 == 0 for v in w2)
        row = next(r for r in plan.table if r["layer"] == "2")
        assert row["expected_gain"] == 0.0 and row["cost_bits"] == 0
    cands = candidates(net, rows)  # no paid protection for a layer without critical faults
    assert {c.protection.scheme for c in cands if c.protection.layer == "2"} == {"invariant"}


def brute_force(cands: list[Candidate], weights: dict, budget: int) -> float:
    """Independent optimum: every subset, conflicts and budget checked directly."""
    best = 0.0
    for r in range(len(cands) + 1):
        for sub in itertools.combinations(cands, r):
            if sum(c.cost for c in sub) > budget:
                continue
            codes = [(c.protection.layer, c.protection.kernel) for c in sub
                     if c.protection.scheme in ("parity", "ecc")]
            if len(codes) != len(set(codes)):
                continue
            total = 0.0
            for key, w in weights.items():
                keep = 1.0
                for c in sub:
                    keep *= 1.0 - c.coverage.get(key, 0.0)
                total += w * (1.0 - keep)
            best = max(best, total)
    return best


def toy() -> tuple[list[Candidate], dict]:
    k = lambda layer, b: (layer, "weight", None, b)  # noqa: E731
    weights = {k("a", 30): 10.0, k("a", 29): 4.0, k("a", 5): 1.0, k("b", 30): 7.0,
               k("b", 29): 3.0, k("c", 30): 5.0}
    c = [
        Candidate(Protection("tmr", "a", bits=(30,)), 6, {k("a", 30): 1.0}),
        Candidate(Protection("tmr", "a", bits=(29,)), 6, {k("a", 29): 1.0}),
        Candidate(Protection("ecc", "a"), 21, {k("a", b): 1.0 for b in (30, 29, 5)}),
        Candidate(Protection("parity", "a", bits=(30, 29)), 3, {k("a", 30): 1.0,
                                                                k("a", 29): 1.0}),
        Candidate(Protection("range", "a", lo=-1, hi=1), 2, {k("a", 30): 0.6, k("a", 29): 0.3}),
        Candidate(Protection("tmr", "b", bits=(30,)), 5, {k("b", 30): 1.0}),
        Candidate(Protection("parity", "b", bits=(30, 29)), 5, {k("b", 30): 1.0,
                                                                k("b", 29): 1.0}),
        Candidate(Protection("ecc", "b"), 9, {k("b", 30): 1.0, k("b", 29): 1.0}),
        Candidate(Protection("tmr", "c", bits=(30,)), 5, {k("c", 30): 1.0}),
        Candidate(Protection("range", "c", lo=0, hi=1), 1, {k("c", 30): 0.5}),
    ]
    return c, weights


@pytest.mark.parametrize("budget", [0, 3, 7, 10, 13, 20, 40])
def test_exact_matches_brute_force_and_greedy_within_budget(budget: int) -> None:
    cands, weights = toy()
    exact = select(cands, weights, budget, "exact")
    greedy = select(cands, weights, budget, "greedy")
    opt = brute_force(cands, weights, budget)
    assert objective([c for c, _ in exact], weights) == pytest.approx(opt)
    for chosen in (exact, greedy):
        assert sum(c.cost for c, _ in chosen) <= budget
        assert sum(g for _, g in chosen) == pytest.approx(objective([c for c, _ in chosen],
                                                                    weights))
    assert objective([c for c, _ in greedy], weights) <= opt + 1e-9


def test_exact_beats_greedy_on_classic_instance() -> None:
    k = lambda layer: (layer, "weight", None, 30)  # noqa: E731
    weights = {k("a"): 7.0, k("b"): 5.0, k("c"): 5.0}
    cands = [Candidate(Protection("tmr", x, bits=(30,)), cost, {k(x): 1.0})
             for x, cost in (("a", 6), ("b", 5), ("c", 5))]
    greedy = select(cands, weights, 10, "greedy")
    exact = select(cands, weights, 10, "exact")
    assert [c.protection.layer for c, _ in greedy] == ["a"]
    assert sorted(c.protection.layer for c, _ in exact) == ["b", "c"]
    assert objective([c for c, _ in exact], weights) == 10.0


def test_exact_on_model_candidates_matches_brute_force() -> None:
    net = tiny_model()
    rows = rows_for(net, {30: 0.9, 29: 0.2, 31: 0.05})
    cands = candidates(net, rows, schemes="tmr,parity,ecc,range")
    assert len(cands) == 12
    weights = {("0" if r["layer"] == "0" else "2", "weight", None, r["bit"]): r["N"] * r["cfr"]
               for r in rows}
    for budget in (50, 120, 300):
        exact = select(cands, weights, budget, "exact")
        assert objective([c for c, _ in exact], weights) == \
            pytest.approx(brute_force(cands, weights, budget))


def test_kernel_granularity() -> None:
    net = tiny_model()
    plan = plan_hardening(net, rows_for(net, CFR, kernels=True), budget=0.05,
                          schemes="tmr,ecc,range")
    assert plan.protections and all(p.kernel is not None for p in plan.protections)
    assert plan.cost_bits <= 0.05 * weight_bits(net)


def test_curve_monotone() -> None:
    net = tiny_model()
    curve = improvement_curve(net, rows_for(net, CFR), budgets=[0.0, 0.01, 0.03, 0.1, 0.3])
    imp = [c["expected_relative_improvement"] for c in curve]
    assert imp == sorted(imp) and imp[-1] > imp[0]
    assert all(c["overhead"] <= c["budget"] for c in curve)
    assert all(c["expected_cfr_after"] <= c["expected_cfr_before"] for c in curve)


def test_errors() -> None:
    net = tiny_model()
    with pytest.raises(ConfigError, match="schemes"):
        parse_schemes("tmr,crc")
    with pytest.raises(ConfigError, match="budget"):
        plan_hardening(net, rows_for(net, CFR), budget=1.5)
    with pytest.raises(ConfigError, match="method"):
        select([], {}, 10, "annealing")
    with pytest.raises(ConfigError, match="layer"):
        candidates(net, [{"layer": "nope", "bit": 30, "N": 5, "cfr": 0.5}])
