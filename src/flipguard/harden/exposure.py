"""Hardening measured over a hardware exposure model (``flipguard harden --hardware``).

Memory protections only act on the read path of stored words (:mod:`~flipguard.harden.
coverage`), but under a systolic exposure model a fault may sit in a PE register or an
accumulator as well as in a buffer. The exposure ``P`` of :func:`flipguard.ra.build_exposure`
is split by *structure* (one exposure per structure, the others' upset weight set to 0, so
the parts add up to ``P``; checked), each structure is mapped to a fault location
(:data:`STRUCTURE_LOCATIONS`), and every campaign fault ``i`` of stratum ``h`` gets the weights
``w_i,loc = (N_h / n_h) P_loc(site_i)``. Then::

    CFR_before = sum_i,loc w_i,loc b_i / sum w,   CFR_after = sum_i,loc w_i,loc a_i,loc / sum w

with ``a_i,loc`` the re-injected outcome where the protections in use cover ``loc`` and the
unprotected outcome ``b_i`` elsewhere (a fault in a PE register after the load is not removed
by ECC in the buffer). Blocks of ``P`` the campaign did not sample (e.g. activations in a
weight campaign) are the ``unmeasured`` share; the improvement over the whole exposure is
bounded for them (their CFR is unknown and no weight protection covers them).

>>> STRUCTURE_LOCATIONS["weight_buffer"], location_of("pe", "weight")
('storage', 'registers')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.harden.coverage import COVERAGE, LOCATIONS
from flipguard.ra import HardwareModel, Sites, analyse, build_exposure, parse_hardware

__all__ = ["STRUCTURE_LOCATIONS", "covered_locations", "exposure_cfr", "location_of",
           "paired_exposure", "split_exposure"]

STRUCTURE_LOCATIONS: dict[str, str] = {
    "weight_buffer": "storage", "activation_buffer": "storage", "output_buffer": "storage",
    "dram": "storage", "memory": "storage", "pe": "registers"}
"""Structure of the exposure models -> fault location (``pe`` of an activation holds both
operand registers and accumulators: location ``registers+datapath``)."""


def location_of(structure: str, target: str) -> str:
    """Fault location of ``structure`` for faults of ``target`` ("unknown" if unmapped)."""
    loc = STRUCTURE_LOCATIONS.get(structure, "unknown")
    return "registers+datapath" if loc == "registers" and target == "activation" else loc


def covered_locations(schemes: Sequence[str | tuple[str, str]], target: str) -> set[str]:
    """Locations of ``target`` faults covered by the schemes in use: ``(scheme, target)``
    pairs (a protection of the ``target`` tensors) or plain scheme names (on the scheme's
    own target of ``COVERAGE``).

    >>> sorted(covered_locations([("ecc", "weight"), "act"], "activation"))
    ['datapath', 'storage']
    >>> covered_locations([("ecc", "weight")], "bias")
    set()
    """
    out: set[str] = set()
    for item in schemes:
        scheme, tgt = (item, COVERAGE[item].target) if isinstance(item, str) else item
        if scheme in COVERAGE and tgt == target:
            out.update(COVERAGE[scheme].locations)
    return out


def _is_covered(location: str, covered: set[str]) -> bool:
    parts = location.split("+")
    return all(p in LOCATIONS and p in covered for p in parts)


def _one_structure(hw: Any, keep: str) -> Any:
    class OneStructure(HardwareModel):
        """``hw`` with every structure but ``keep`` at upset weight 0."""

        name, spec = hw.name, hw.spec

        def exposure(self, graph: Any, fmt: Any) -> Any:
            return hw.exposure(graph, fmt)

        def structure_weights(self, raw: bool = False) -> dict[str, float]:
            w = hw.structure_weights(raw)
            return w if raw else {s: (v if s == keep else 0.0) for s, v in w.items()}

        def upset_rate(self, structure: str) -> float | None:
            return hw.upset_rate(structure)

        def config(self) -> dict[str, Any]:
            return hw.config()

        def info(self, graph: Any, fmt: Any = None) -> dict[str, Any]:
            return hw.info(graph, fmt)

    return OneStructure()


def split_exposure(model: nn.Module, x: Tensor, hardware: str, fmt: str = "fp32",
                   targets: Sequence[str] = ("weight", "bias", "activation")
                   ) -> tuple[Any, dict[str, Any]]:
    """``(P, {structure: P_s})`` with ``P_s`` the exposure of ``structure`` alone (as an
    unnormalised share: ``P_s.total / P.total`` is its share); raises when the parts do not
    add up to ``P`` (the exposure API changed).

    >>> import torch
    >>> p, parts = split_exposure(nn.Sequential(nn.Linear(4, 3)), torch.zeros(1, 4), "systolic")
    >>> sorted(parts), round(sum(q.total for q in parts.values()) / p.total, 6)
    (['activation_buffer', 'output_buffer', 'pe', 'weight_buffer'], 1.0)
    """
    hw = parse_hardware(hardware)
    graph = analyse(model, x)
    full = build_exposure(model, x, hw, targets=targets, fmt=fmt, graph=graph)
    parts: dict[str, Any] = {}
    for s, w in hw.structure_weights().items():
        if w <= 0:
            continue
        try:
            parts[s] = build_exposure(model, x, _one_structure(hw, s), targets=targets,
                                      fmt=fmt, graph=graph)
        except ConfigError:  # no site in this structure
            continue
    for b in full.blocks:
        got = sum(p.block(*b.key).mass for p in parts.values() if p.block(*b.key) is not None)
        if not np.isclose(got, b.mass, rtol=1e-6, atol=0.0):
            raise ConfigError(f"--hardware: the per-structure exposures of {b.target}:"
                              f"{b.layer} do not add up ({got} vs {b.mass}); cannot split "
                              f"{hardware!r} by structure")
    return full, parts


def _site_mass(dist: Any, faults: Sequence[Any]) -> np.ndarray:
    sites = Sites.from_records([(f.target, f.layer, int(f.index), int(f.bits[0]))
                                for f in faults])
    return dist.prob(sites) * dist.total


def exposure_cfr(full: Any, parts: dict[str, Any], faults: Sequence[Any],
                 strata: Sequence[str], N: dict[str, int], before: np.ndarray,
                 after: np.ndarray, schemes: Sequence[str | tuple[str, str]]
                 ) -> dict[str, Any]:
    """Exposure-weighted CFR before/after of the paired faults (module docstring).
    ``schemes``: ``(scheme, target)`` of the protections in use (``"act"`` when activation
    clamping is on), see :func:`covered_locations`."""
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    keys = np.asarray(list(strata))
    n_h = {k: int((keys == k).sum()) for k in dict.fromkeys(strata)}
    expand = np.array([N[k] / n_h[k] for k in strata])
    total = full.total
    num_b = num_a = num_s = den = 0.0
    loc_mass: dict[str, dict[str, float]] = {}
    for s, p in parts.items():
        for blk in p.blocks:
            loc = location_of(s, blk.target)
            d = loc_mass.setdefault(blk.target, {})
            d[loc] = d.get(loc, 0.0) + blk.mass / total
    covered_share = 0.0
    for target, d in loc_mass.items():
        cov = covered_locations(schemes, target)
        covered_share += sum(v for loc, v in d.items() if _is_covered(loc, cov))
    for s, p in parts.items():
        m = _site_mass(p, faults) / total * expand
        for target in {f.target for f in faults}:
            sel = np.array([f.target == target for f in faults])
            loc = location_of(s, target)
            out = a if _is_covered(loc, covered_locations(schemes, target)) else b
            num_b += float((m * b)[sel].sum())
            num_a += float((m * out)[sel].sum())
            num_s += float((m * a)[sel].sum())
            den += float(m[sel].sum())
    sampled = {(f.target, f.layer) for f in faults}
    measured = sum(blk.mass for blk in full.blocks if blk.key in sampled) / total
    unmeasured: dict[str, float] = {}
    for blk in full.blocks:
        if blk.key not in sampled:
            unmeasured[blk.target] = unmeasured.get(blk.target, 0.0) + blk.mass / total
    if den <= 0:
        cb = ca = cs = float("nan")
    else:
        cb, ca, cs = num_b / den, num_a / den, num_s / den
    rel = (cb - ca) / cb if cb > 0 else float("nan")
    u = 1.0 - measured
    whole_lo = (1 - u) * (cb - ca) / ((1 - u) * cb + u) if cb > 0 else float("nan")
    return {"hardware": full.name, "measured_share": measured, "unmeasured": unmeasured,
            "locations": loc_mass, "covered_share": covered_share,
            "cfr_before": cb, "cfr_after": ca, "relative_improvement": rel,
            "relative_improvement_if_all_storage": (cb - cs) / cb if cb > 0 else float("nan"),
            "whole_exposure": {"relative_improvement_if_same_cfr": (1 - u) * rel,
                               "relative_improvement_range": [whole_lo, rel]},
            "structures": {s: p.total / total for s, p in parts.items()}}


def paired_exposure(model: nn.Module, x: Tensor, hardware: str, fmt: str, paired: Any,
                    N: dict[str, int], schemes: Sequence[str | tuple[str, str]]
                    ) -> dict[str, Any]:
    """:func:`exposure_cfr` of a :class:`~flipguard.harden.paired.PairedResult` ``paired``
    under ``hardware``'s exposure of ``model`` on sample ``x`` (stratum sizes ``N``)."""
    full, parts = split_exposure(model, x, hardware, fmt)
    return exposure_cfr(full, parts, paired.faults, paired.strata, N, paired.before,
                        paired.after, list(dict.fromkeys(schemes)))
