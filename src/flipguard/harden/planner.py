"""Choose protections under a memory budget from a campaign's per-layer x bit CFR table.

Each stratum ``s`` (layer, target, kernel or None, bit) of the CFR table carries ``W_s =
N_s * CFR_s`` expected critical faults. A protection neutralises a single-bit fault of ``s``
with probability ``cov(p, s)``: 1 for TMR on that bit, parity over a group holding it, SEC-DED
ECC and invariant forcing of a constant bit; for range restriction the fraction of the
stratum's words whose flipped value falls outside ``[lo, hi]`` (or is NaN) and gets clamped
(an estimate: clamping bounds the error, paired re-injection measures the truth). A detected
word under policy ``zero`` is counted as neutralised. The expected gain of a set ``P`` is
``sum_s W_s (1 - prod_{p in P} (1 - cov(p, s)))``.

Selection: free protections first (every layer invariant, observed gain or not), then greedy
on marginal gain per bit (lazy greedy, exact marginal gains), or ``method="exact"``: Pareto
dynamic programming over groups (optimal; for small instances). One word code (parity or ECC)
per group.

>>> plan = plan_hardening(model, rows, budget=0.03)          # doctest: +SKIP
>>> [r["protection"] for r in plan.table][:2]                 # doctest: +SKIP
['invariant[30] encoder.0.weight', 'range encoder.0.weight']
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flipguard.errors import ConfigError
from flipguard.faults import NumberFormat, get_format, kernel_ids
from flipguard.harden.mechanisms import (
    POLICIES,
    SCHEMES,
    Protection,
    constant_bits,
    parse_schemes,
    to_signed,
    to_unsigned,
)

__all__ = ["Candidate", "HardeningPlan", "candidates", "conflicts", "improvement_curve",
           "objective", "parse_schemes", "plan_hardening", "range_fractions", "select",
           "stratum_weights", "tensor_words", "weight_bits"]

Key = tuple[str, str, "int | None", int]  # (layer, target, kernel, bit)
EXACT_MAX_PER_GROUP = 14


def weight_bits(model: nn.Module, fmt: NumberFormat | str = "fp32") -> int:
    """Weight memory of ``model`` in bits: every parameter element times the word width."""
    return sum(p.numel() for p in model.parameters()) * get_format(fmt).bits


def tensor_words(model: nn.Module, layer: str, target: str, fmt: NumberFormat | str = "fp32"
                 ) -> tuple[torch.Tensor, torch.Tensor, NumberFormat]:
    """(unsigned stored words, kernel id per element, bound format) of a layer's tensor,
    all flattened except the format, which is bound to the tensor's full shape."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ConfigError(f"layer: {layer!r} is not a module of the model") from None
    t = getattr(module, target, None)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"target: layer {layer!r} has no {target!r} tensor")
    t = t.detach().cpu().to(torch.float32)
    ids = kernel_ids(module, target).expand(t.shape)
    bound = get_format(fmt).bind(t, kernel_ids=ids)
    words = to_unsigned(bound.encode(bound.quantize(t)), bound.bits)
    return words.reshape(-1), ids.reshape(-1).clone(), bound


def stratum_weights(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[Key, float], int]:
    """(``{(layer, target, kernel, bit): N * CFR}``, total population) from CFR rows with
    ``layer``, ``bit``, ``N``, ``cfr`` and optionally ``target`` and ``kernel``."""
    out: dict[Key, float] = {}
    pop = 0
    for r in rows:
        if "layer" not in r or "bit" not in r or "N" not in r:
            raise ConfigError("rows: expected CFR rows by layer and bit with N (cfr_table by="
                              "('layer', 'target', 'bit'))")
        cfr = r.get("cfr")
        if r.get("target", "weight") == "activation":
            continue
        pop += int(r["N"])
        if cfr is None or not math.isfinite(float(cfr)):
            continue
        key = (str(r["layer"]), str(r.get("target", "weight")),
               None if r.get("kernel") is None else int(r["kernel"]), int(r["bit"]))
        out[key] = out.get(key, 0.0) + int(r["N"]) * float(cfr)
    return out, pop


@dataclass
class Candidate:
    """A protection with its cost in bits and coverage ``{stratum key: P(neutralised)}``."""

    protection: Protection
    cost: int
    coverage: dict[Key, float]

    @property
    def group(self) -> tuple[str, str, int | None]:
        p = self.protection
        return (p.layer, p.target, p.kernel)


def range_fractions(words: torch.Tensor, fmt: NumberFormat, lo: float, hi: float
                    ) -> torch.Tensor:
    """float (bits,): fraction of the unsigned ``words`` whose single flip of bit ``b`` reads
    outside ``[lo, hi]`` or NaN (``fmt`` bound to these elements for INT8)."""
    out = []
    for b in range(fmt.bits):
        v = fmt.decode(to_signed(words ^ (1 << b), fmt.word_dtype, fmt.bits))
        out.append((torch.isnan(v) | (v < lo) | (v > hi)).float().mean())
    return torch.stack(out)


def candidates(model: nn.Module, rows: Iterable[Mapping[str, Any]],
               fmt: NumberFormat | str = "fp32", schemes: Sequence[str] = SCHEMES,
               policy: str = "zero") -> list[Candidate]:
    """Candidate protections of every group that has critical faults in ``rows``.

    Groups are layers, or kernels when the rows carry a ``kernel``; layer invariants are
    always offered (free). Parity covers the group's bits with CFR > 0.
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy: expected zero or reload, got {policy!r}")
    schemes = parse_schemes(schemes)
    weights, _ = stratum_weights(rows)
    by_layer: dict[tuple[str, str], dict[Key, float]] = {}
    for key, w in weights.items():
        by_layer.setdefault(key[:2], {})[key] = w
    out: list[Candidate] = []
    for (layer, target), strata in by_layer.items():
        words, ids, bound = tensor_words(model, layer, target, fmt)
        nb = bound.bits
        kernels = sorted({k[2] for k in strata}, key=lambda k: -1 if k is None else k)
        if "invariant" in schemes:
            mask, vals = constant_bits(words, nb)
            cov = {k: 1.0 for k in strata if mask >> k[3] & 1}
            if mask:  # offered even without observed critical faults: free and exact
                out.append(Candidate(Protection("invariant", layer, target, None,
                                                tuple(b for b in range(nb) if mask >> b & 1),
                                                vals), 0, cov))
        vals_f = bound.decode(to_signed(words, bound.word_dtype, nb).reshape(
            _shape(model, layer, target))).reshape(-1)
        for kern in kernels:
            sel = torch.ones_like(ids, dtype=torch.bool) if kern is None else ids == kern
            n = int(sel.sum())
            mine = {k: w for k, w in strata.items() if k[2] == kern}
            crit_bits = tuple(sorted(k[3] for k, w in mine.items() if w > 0))
            if not crit_bits:
                continue

            def add(p: Protection, cov: dict[Key, float], n: int = n, nb: int = nb) -> None:
                if any(v > 0 for v in cov.values()):
                    out.append(Candidate(p, p.cost_bits(n, nb), cov))

            if "invariant" in schemes and kern is not None:
                mask, vals = constant_bits(words[sel], nb)
                bits = tuple(b for b in range(nb) if mask >> b & 1)
                if bits:
                    add(Protection("invariant", layer, target, kern, bits, vals),
                        {k: 1.0 for k in mine if k[3] in bits})
            if "tmr" in schemes:
                for b in sorted(crit_bits, reverse=True):
                    add(Protection("tmr", layer, target, kern, (b,)),
                        {k: 1.0 for k in mine if k[3] == b})
            if "parity" in schemes:
                add(Protection("parity", layer, target, kern, crit_bits, policy=policy),
                    {k: 1.0 for k in mine if k[3] in crit_bits})
            if "ecc" in schemes:
                add(Protection("ecc", layer, target, kern, policy=policy),
                    {k: 1.0 for k in mine})
            if "range" in schemes:
                v = vals_f[sel]
                lo, hi = float(v.min()), float(v.max())
                frac = range_fractions(words[sel], bound.select(torch.nonzero(sel).reshape(-1)),
                                       lo, hi)
                add(Protection("range", layer, target, kern, lo=lo, hi=hi),
                    {k: float(frac[k[3]]) for k in mine})
    return out


def _shape(model: nn.Module, layer: str, target: str) -> torch.Size:
    return getattr(model.get_submodule(layer), target).shape


def objective(chosen: Iterable[Candidate], weights: Mapping[Key, float]) -> float:
    """Expected critical faults removed: ``sum_s W_s (1 - prod (1 - cov))``."""
    residual = dict.fromkeys(weights, 1.0)
    for c in chosen:
        for k, v in c.coverage.items():
            if k in residual:
                residual[k] *= 1.0 - v
    return sum(w * (1.0 - residual[k]) for k, w in weights.items())


def conflicts(a: Candidate, b: Candidate) -> bool:
    """Two word codes (parity/ECC) on the same group, or the same protection twice."""
    codes = ("parity", "ecc")
    same = a.group == b.group
    return same and ((a.protection.scheme in codes and b.protection.scheme in codes)
                     or a.protection == b.protection)


def _gain(c: Candidate, residual: Mapping[Key, float], weights: Mapping[Key, float]) -> float:
    return sum(weights.get(k, 0.0) * residual.get(k, 1.0) * v for k, v in c.coverage.items())


def _greedy(cands: Sequence[Candidate], weights: Mapping[Key, float], budget: int
            ) -> list[tuple[Candidate, float]]:
    residual = dict.fromkeys(weights, 1.0)
    chosen: list[tuple[Candidate, float]] = []
    spent = 0

    def take(c: Candidate) -> None:
        nonlocal spent
        g = _gain(c, residual, weights)
        for k, v in c.coverage.items():
            if k in residual:
                residual[k] *= 1.0 - v
        chosen.append((c, g))
        spent += c.cost

    for c in cands:  # free protections first; layer invariants whatever this sample saw
        if c.cost == 0 and (_layer_invariant(c) or _gain(c, residual, weights) > 0):
            take(c)
    heap = [(-_gain(c, residual, weights) / c.cost, i) for i, c in enumerate(cands) if c.cost]
    heapq.heapify(heap)
    while heap:
        neg, i = heapq.heappop(heap)
        c = cands[i]
        if spent + c.cost > budget or any(conflicts(c, o) for o, _ in chosen):
            continue
        ratio = _gain(c, residual, weights) / c.cost
        if ratio <= 0:
            continue
        if heap and ratio < -heap[0][0] - 1e-12 * abs(ratio):
            heapq.heappush(heap, (-ratio, i))  # stale bound: re-queue with the current ratio
            continue
        take(c)
    return chosen


def _exact(cands: Sequence[Candidate], weights: Mapping[Key, float], budget: int
           ) -> list[tuple[Candidate, float]]:
    free = [c for c in cands if c.cost == 0]
    rest = [c for c in cands if c not in free]
    groups: dict[tuple, list[Candidate]] = {}
    for c in rest:
        groups.setdefault(c.group, []).append(c)
    # frontier: list of (cost, gain, chosen) Pareto-optimal, gains measured after `free`
    frontier: list[tuple[int, float, tuple[Candidate, ...]]] = [(0, 0.0, ())]
    base = objective(free, weights)
    for group, items in groups.items():
        if len(items) > EXACT_MAX_PER_GROUP:
            raise ConfigError(f"method: exact planning of {group[0]!r} has {len(items)} "
                              f"candidates (max {EXACT_MAX_PER_GROUP}); use method='greedy'")
        options = []
        for r in range(len(items) + 1):
            for sub in itertools.combinations(items, r):
                if any(conflicts(a, b) for a, b in itertools.combinations(sub, 2)):
                    continue
                cost = sum(c.cost for c in sub)
                if cost <= budget:
                    options.append((cost, objective(free + list(sub), weights) - base, sub))
        merged = [(c1 + c2, g1 + g2, s1 + s2) for c1, g1, s1 in frontier
                  for c2, g2, s2 in options if c1 + c2 <= budget]
        merged.sort(key=lambda t: (t[0], -t[1]))
        frontier, best = [], -math.inf
        for item in merged:
            if item[1] > best + 1e-12:
                frontier.append(item)
                best = item[1]
    _, _, sub = max(frontier, key=lambda t: (t[1], -t[0]))
    out: list[tuple[Candidate, float]] = []
    done: list[Candidate] = []
    for c in free + sorted(sub, key=lambda c: -objective(free + [c], weights) / c.cost):
        out.append((c, objective(done + [c], weights) - objective(done, weights)))
        done.append(c)
    return out


def select(cands: Sequence[Candidate], weights: Mapping[Key, float], budget_bits: int,
           method: str = "greedy") -> list[tuple[Candidate, float]]:
    """Chosen candidates (in order) with their marginal expected gains, within
    ``budget_bits``. ``method``: "greedy" or "exact"."""
    if method == "greedy":
        return _greedy(cands, weights, int(budget_bits))
    if method == "exact":
        return _exact(cands, weights, int(budget_bits))
    raise ConfigError(f"method: expected greedy or exact, got {method!r}")


@dataclass
class HardeningPlan:
    """Chosen protections and the explanation table (see ``to_dict``)."""

    protections: list[Protection]
    table: list[dict[str, Any]]
    budget: float
    budget_bits: int
    weight_bits: int
    cost_bits: int
    expected_critical: float
    expected_removed: float
    population: int
    reload_bits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        """Extra storage as a fraction of the weight memory."""
        return self.cost_bits / self.weight_bits if self.weight_bits else 0.0

    @property
    def expected_cfr_before(self) -> float:
        return self.expected_critical / self.population if self.population else float("nan")

    @property
    def expected_cfr_after(self) -> float:
        left = self.expected_critical - self.expected_removed
        return max(left, 0.0) / self.population if self.population else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "budget_bits": self.budget_bits,
                "weight_bits": self.weight_bits, "cost_bits": self.cost_bits,
                "overhead": self.overhead, "reload_bits": self.reload_bits,
                "expected_cfr_before": self.expected_cfr_before,
                "expected_cfr_after": self.expected_cfr_after,
                "protections": [p.to_dict() for p in self.protections], "table": self.table}


def _layer_invariant(c: Candidate) -> bool:
    """A whole-layer invariant: costs nothing, changes no fault-free value and masks its bits'
    flips in every word, so it is taken even where the campaign saw no critical fault there
    (a sampled campaign misses whole cells; the held-out check in BENCHMARKS §5 shows why)."""
    return c.protection.scheme == "invariant" and c.protection.kernel is None


def plan_hardening(model: nn.Module, rows: Sequence[Mapping[str, Any]],
                   fmt: NumberFormat | str = "fp32", budget: float = 0.03,
                   schemes: Sequence[str] | str = SCHEMES, policy: str = "zero",
                   method: str = "greedy", cands: Sequence[Candidate] | None = None
                   ) -> HardeningPlan:
    """Protections removing the most expected critical faults within ``budget`` (a fraction
    of the weight memory, e.g. 0.03).

    >>> rows = cfr_table(run, by=("layer", "target", "bit"))  # doctest: +SKIP
    >>> plan = plan_hardening(run.model, rows, budget=0.03)  # doctest: +SKIP
    """
    if not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 1.0:
        raise ConfigError(f"budget: expected a fraction of the weight memory in [0, 1], "
                          f"got {budget!r}")
    fmt = get_format(fmt)
    schemes = parse_schemes(schemes)
    weights, pop = stratum_weights(rows)
    cands = list(cands) if cands is not None else candidates(model, rows, fmt, schemes, policy)
    total = weight_bits(model, fmt)
    budget_bits = int(math.floor(float(budget) * total))
    chosen = select(cands, weights, budget_bits, method)
    table, cum = [], 0
    reload = 0
    for c, gain in chosen:
        p = c.protection
        cum += c.cost
        if p.scheme in ("parity", "ecc") and p.policy == "reload":
            _, ids, _ = tensor_words(model, p.layer, p.target, fmt)
            reload += int(ids.numel() if p.kernel is None else (ids == p.kernel).sum()) * fmt.bits
        table.append({"protection": p.label, "scheme": p.scheme, "layer": p.layer,
                      "target": p.target, "kernel": p.kernel, "bits": list(p.bits),
                      "cost_bits": c.cost, "expected_gain": gain, "cumulative_bits": cum,
                      "cumulative_overhead": cum / total if total else 0.0})
    return HardeningPlan([c.protection for c, _ in chosen], table, float(budget), budget_bits,
                         total, cum, float(sum(weights.values())),
                         float(sum(g for _, g in chosen)), pop, reload)


def improvement_curve(model: nn.Module, rows: Sequence[Mapping[str, Any]],
                      budgets: Sequence[float] | None = None, fmt: NumberFormat | str = "fp32",
                      schemes: Sequence[str] | str = SCHEMES, policy: str = "zero",
                      method: str = "greedy") -> list[dict[str, Any]]:
    """Expected CFR after hardening vs overhead for ``budgets`` (default 0, 1, ..., 10 %)."""
    budgets = list(np.round(np.linspace(0.0, 0.10, 11), 4)) if budgets is None else budgets
    fmt = get_format(fmt)
    cands = candidates(model, rows, fmt, parse_schemes(schemes), policy)
    out = []
    for b in budgets:
        plan = plan_hardening(model, rows, fmt, float(b), schemes, policy, method, cands)
        before = plan.expected_cfr_before
        out.append({"budget": float(b), "overhead": plan.overhead,
                    "expected_cfr_before": before, "expected_cfr_after": plan.expected_cfr_after,
                    "expected_relative_improvement":
                        (plan.expected_removed / plan.expected_critical
                         if plan.expected_critical > 0 else 0.0),
                    "n_protections": len(plan.protections)})
    return out
