"""What each protection covers, and the hardening improvement over a hardware exposure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.faults import Fault
from flipguard.harden import COVERAGE, LOCATIONS, SCHEMES, Protection, coverage_summary
from flipguard.harden.exposure import (
    covered_locations,
    exposure_cfr,
    location_of,
    split_exposure,
)
from flipguard.harden.planner import tensor_words


def test_every_scheme_declares_locations_and_read_path_cost() -> None:
    assert set(COVERAGE) == set(SCHEMES) | {"act"}
    for s in SCHEMES:  # read-path mechanisms of stored weights: storage only
        c = Protection(s, "0", bits=(30,), lo=-1.0, hi=1.0).coverage
        assert c.target == "weight" and c.locations == ("storage",)
        assert c.to_dict()["not_covered"] == ["datapath", "registers"] and c.per_load
    assert set(COVERAGE["act"].locations) == {"storage", "datapath"}
    assert all(loc in LOCATIONS for c in COVERAGE.values() for loc in c.locations)
    assert "mask" in COVERAGE["invariant"].read_path
    assert "decoder" in COVERAGE["ecc"].read_path and "vote" in COVERAGE["tmr"].read_path


def test_coverage_summary_adds_up_memory_bits_and_words() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3))
    prots = [Protection("ecc", "0"), Protection("tmr", "2", bits=(30, 29)),
             Protection("tmr", "2", kernel=1, bits=(28,)), Protection("invariant", "0",
                                                                      bits=(30,), values=0)]
    rows = {r["scheme"]: r for r in coverage_summary(net, prots)}
    n0, n2 = net[0].weight.numel(), net[2].weight.numel()
    assert rows["ecc"]["memory_bits"] == 7 * n0 and rows["ecc"]["protected_words"] == n0
    _, ids, _ = tensor_words(net, "2", "weight")
    k1 = int((ids == 1).sum())
    assert k1 == n2 // 3
    assert rows["tmr"]["memory_bits"] == 2 * 2 * n2 + 2 * k1
    assert rows["tmr"]["protected_words"] == n2 + k1 and rows["tmr"]["protections"] == 2
    assert rows["invariant"]["memory_bits"] == 0


def test_locations_of_structures() -> None:
    assert location_of("weight_buffer", "weight") == "storage"
    assert location_of("pe", "weight") == "registers"
    assert location_of("pe", "activation") == "registers+datapath"
    assert covered_locations([("ecc", "weight")], "weight") == {"storage"}
    assert covered_locations([("ecc", "bias")], "weight") == set()


NET_IN = torch.zeros(1, 1, 6, 6)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3)).eval()


def every_weight_fault(model: nn.Module) -> tuple[list[Fault], list[str], dict[str, int]]:
    faults, strata = [], []
    for name in ("0", "2"):
        n = model.get_submodule(name).weight.numel()
        faults += [Fault("weight", name, i, (b,)) for i in range(n) for b in range(32)]
        strata += [name] * (32 * n)
    return faults, strata, {k: strata.count(k) for k in ("0", "2")}


def test_memory_model_exposure_cfr_equals_exhaustive_weighting() -> None:
    model = net()
    faults, strata, N = every_weight_fault(model)  # exhaustive: weights (N_h / n_h) = 1
    g = np.random.Generator(np.random.PCG64(1))
    b = g.random(len(faults)) < 0.3
    a = b & (g.random(len(faults)) < 0.5)
    full, parts = split_exposure(model, NET_IN, "memory", targets=("weight",))
    from flipguard.ra import Sites

    p = full.prob(Sites.from_records([(f.target, f.layer, f.index, f.bits[0])
                                      for f in faults]))
    assert p.sum() == pytest.approx(1.0)
    e = exposure_cfr(full, parts, faults, strata, N, b, a, [("ecc", "weight")])
    assert e["cfr_before"] == pytest.approx(float((p * b).sum()))
    assert e["cfr_after"] == pytest.approx(float((p * a).sum()))  # all storage: all covered
    assert e["measured_share"] == pytest.approx(1.0) and e["covered_share"] == pytest.approx(1)


def test_systolic_registers_are_not_removed_by_memory_protection() -> None:
    model = net()
    faults, strata, N = every_weight_fault(model)
    full, parts = split_exposure(model, NET_IN, "systolic", targets=("weight",))
    pe = full.info.get("structures", {}).get("pe", {}).get("share")
    assert set(parts) >= {"pe", "weight_buffer"}
    ones, zeros = np.ones(len(faults), bool), np.zeros(len(faults), bool)
    # every fault critical before, every one removed where protected: what is left is the
    # PE-register share of the exposure (independently: the RA structure breakdown)
    e = exposure_cfr(full, parts, faults, strata, N, ones, zeros, [("ecc", "weight")])
    reg = e["locations"]["weight"]["registers"]
    assert e["cfr_before"] == pytest.approx(1.0) and 0 < reg < 1
    assert e["cfr_after"] == pytest.approx(reg)
    if pe is not None:
        assert reg == pytest.approx(pe)
    assert e["relative_improvement"] == pytest.approx(1 - reg)
    assert e["relative_improvement_if_all_storage"] == pytest.approx(1.0)
    # with activations in the exposure but not in the campaign: an unmeasured share
    full2, parts2 = split_exposure(model, NET_IN, "systolic")
    e2 = exposure_cfr(full2, parts2, faults, strata, N, ones, zeros, [("ecc", "weight")])
    u = 1 - e2["measured_share"]
    assert u == pytest.approx(e2["unmeasured"]["activation"] + e2["unmeasured"].get("bias", 0))
    assert e2["whole_exposure"]["relative_improvement_if_same_cfr"] == pytest.approx(
        (1 - u) * e2["relative_improvement"])
