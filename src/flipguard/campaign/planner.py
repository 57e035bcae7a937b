"""Campaign planning: strata, Leveugle sample sizes, data-aware priors, seeded fault lists.

The population of a stratum is ``sites x kinds`` (a bit flip has one kind, stuck-at two:
stuck-at-0 and stuck-at-1). Stratum-local fault ``j`` is site ``j // K`` of the stratum (see
``flipguard.faults.SiteSpace``) with kind ``kinds[j % K]``. Each stratum draws with its own
``numpy`` generator seeded by ``SeedSequence([seed, round, *sha256(key)])``, so adding or
removing a stratum never changes the faults of another.

>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
>>> plan = make_plan(net, PlanConfig(strata="layer", error=0.05, confidence=0.95))
>>> plan.population, [s.n for s in plan.strata]
(1088, [231, 220])
>>> len(plan.faults()) == plan.total
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from flipguard.campaign.stats import (
    ROUNDINGS,
    allocate,
    check_confidence,
    check_error,
    check_p,
    leveugle_n,
)
from flipguard.errors import ConfigError
from flipguard.faults import Fault, SiteSpace, apply_bits, get_format
from flipguard.inject.outcomes import parse_criterion

__all__ = ["FAULT_MODELS", "P_FLOOR", "SAMPLINGS", "STRATA", "Plan", "PlanConfig",
           "PlannedFault", "PlannedStratum", "data_aware_p", "draw_faults", "make_plan",
           "stratum_rng"]

FAULT_MODELS: dict[str, tuple[str, ...]] = {"bitflip": ("flip",),
                                             "stuck-at": ("stuck-at-0", "stuck-at-1")}
STRATA = ("network", "layer", "layer,bit", "layer,field", "layer,kernel", "layer,bit,kernel",
          "layer,field,kernel")
SAMPLINGS = ("uniform", "stratified")
P_FLOOR = 0.01
"""Data-aware priors are clamped to [P_FLOOR, 1 - P_FLOOR] (see docs/campaigns.md)."""


def _canon_strata(text: str) -> str:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    order = {"network": 0, "layer": 1, "bit": 2, "field": 2, "kernel": 3}
    if any(p not in order for p in parts) or not parts:
        raise ConfigError(f"strata: expected one of {' | '.join(STRATA)} or a JSON file, "
                          f"got {text!r}")
    canon = ",".join(sorted(dict.fromkeys(parts), key=lambda p: order[p]))
    if canon in ("bit", "field", "kernel", "bit,kernel", "field,kernel"):
        canon = "layer," + canon
    if canon not in STRATA:
        raise ConfigError(f"strata: expected one of {' | '.join(STRATA)}, got {text!r}")
    return canon


@dataclass(frozen=True)
class PlanConfig:
    """What to inject and how precisely. ``p`` is a number in (0, 1) or ``"data-aware"``;
    ``user_strata`` (a list of ``{"layer", "target", "bit", "bits", "kernel", "n"}`` objects)
    replaces ``strata`` when given.

    >>> PlanConfig(strata="bit,layer", p="0.5").strata
    'layer,bit'
    """

    strata: str = "layer"
    error: float = 0.01
    confidence: float = 0.99
    p: float | str = 0.5
    fault_model: str = "bitflip"
    rounding: str = "ceil"
    layers: tuple[str, ...] | None = None
    targets: tuple[str, ...] = ("weight",)
    fmt: str = "fp32"
    seed: int = 0
    user_strata: tuple[dict[str, Any], ...] | None = field(default=None)
    sampling: str = "uniform"
    criterion: str = "accuracy-drop:0.01"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("strata", "user" if self.user_strata is not None else _canon_strata(self.strata))
        set_("error", check_error(self.error))
        set_("confidence", check_confidence(self.confidence))
        if isinstance(self.p, str) and self.p.strip() in ("data-aware", "data_aware"):
            set_("p", "data-aware")
        else:
            try:
                set_("p", check_p(float(self.p)))
            except (TypeError, ValueError):
                raise ConfigError(f"p: expected a number in (0, 1) or 'data-aware', "
                                  f"got {self.p!r}") from None
        if self.fault_model not in FAULT_MODELS:
            raise ConfigError(f"fault-model: expected one of {', '.join(FAULT_MODELS)}, "
                              f"got {self.fault_model!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding: expected one of {', '.join(ROUNDINGS)}, "
                              f"got {self.rounding!r}")
        targets = tuple(dict.fromkeys(self.targets))
        if not targets or any(t not in ("weight", "bias") for t in targets):
            raise ConfigError(f"targets: expected weight and/or bias, got {','.join(targets)!r}")
        set_("targets", targets)
        if self.layers is not None:
            set_("layers", tuple(self.layers) or None)
        if self.user_strata is not None:
            set_("user_strata", tuple(dict(s) for s in self.user_strata))
        get_format(self.fmt)
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling: expected uniform or stratified, got {self.sampling!r}")
        set_("criterion", parse_criterion(self.criterion).text)

    @property
    def kinds(self) -> tuple[str, ...]:
        return FAULT_MODELS[self.fault_model]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("layers", "targets", "user_strata"):
            d[k] = None if d[k] is None else list(d[k])
        if self.sampling == "uniform":  # uniform plans keep their digests
            del d["sampling"], d["criterion"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanConfig:
        d = dict(d)
        for k in ("layers", "targets", "user_strata"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (identifies a plan)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PlannedStratum:
    """One stratum: ``N`` = sites x kinds, ``n`` planned faults, prior ``p``."""

    key: str
    layer: str
    target: str
    bit: int | None
    bits: tuple[int, ...] | None
    kernel: int | None
    sites: int
    N: int
    n: int
    p: float
    bit_list: tuple[int, ...] = ()
    elements: int = 0
    kernel_numel: int = 0
    kinds: tuple[str, ...] = ("flip",)
    crit: int | None = None  # criticality sub-stratum: predicted class,
    parent: str | None = None  # the stratum it splits,
    counts: tuple[tuple[int, int, int, int], ...] | None = None  # (kind, bit, kernel, count)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("bits", "bit_list", "kinds"):
            d[k] = None if d[k] is None else list(d[k])
        return {k: v for k, v in d.items() if v is not None or k not in ("crit", "parent",
                                                                         "counts")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlannedStratum:
        d = dict(d)
        for k in ("bits", "bit_list", "kinds"):
            d[k] = None if d.get(k) is None else tuple(d[k])
        if d.get("counts") is not None:
            d["counts"] = tuple(tuple(int(v) for v in row) for row in d["counts"])
        return cls(**d)

    def population_of(self, bits: Sequence[int] | None = None, kernel: int | None = None,
                      kind: str | None = None) -> int:
        """Population of this stratum restricted to ``bits``, one ``kernel``, one ``kind``."""
        if kernel is not None and self.kernel is not None and kernel != self.kernel:
            return 0
        if self.counts is not None:
            return sum(c for ki, b, kern, c in self.counts
                       if (bits is None or b in set(bits)) and kernel in (None, kern)
                       and kind in (None, self.kinds[ki]))
        elems = self.kernel_numel if kernel is not None and self.kernel is None else self.elements
        nb = len(self.bit_list) if bits is None else len(set(bits) & set(self.bit_list))
        nk = len(self.kinds) if kind is None else int(kind in self.kinds)
        return elems * nb * nk


@dataclass(frozen=True)
class PlannedFault:
    """A fault of the plan: id, stratum key, stratum-local number ``k``, the fault, the
    kernel of its element and the refinement round that drew it (0 = the plan itself)."""

    fault_id: int
    stratum: str
    k: int
    fault: Fault
    kernel: int
    round: int = 0


@dataclass
class Plan:
    """A campaign plan: config + strata; ``faults()`` draws the seeded fault list."""

    config: PlanConfig
    strata: list[PlannedStratum]
    space: SiteSpace | None = field(default=None, repr=False)

    @property
    def population(self) -> int:
        return sum(s.N for s in self.strata)

    @property
    def total(self) -> int:
        return sum(s.n for s in self.strata)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "population": self.population,
                "total": self.total, "strata": [s.to_dict() for s in self.strata]}

    def faults(self, start_id: int = 0) -> list[PlannedFault]:
        """All planned faults, ids ``start_id..`` in stratum order, sorted by ``k`` within."""
        if self.space is None:
            raise ConfigError("plan: no site space attached (plan built from a dict)")
        out: list[PlannedFault] = []
        for s in self.strata:
            drawn = draw_faults(self.space, s, s.n, self.config.seed, self.config.kinds)
            out += [PlannedFault(start_id + len(out) + i, s.key, k, f, kern)
                    for i, (k, f, kern) in enumerate(drawn)]
        return out


def stratum_rng(seed: int, key: str, round_: int = 0) -> np.random.Generator:
    """Generator of one stratum: ``SeedSequence([seed, round, *sha256(key) words])``."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(round_),
                                                         *map(int, words)]))


def _choose(rng: np.random.Generator, total: int, n: int, exclude: np.ndarray) -> np.ndarray:
    excl = np.unique(exclude.astype(np.int64))
    left = total - len(excl)
    if not 0 <= n <= left:
        raise ConfigError(f"n: expected 0..{left} faults left in the stratum, got {n}")
    r = rng.choice(left, size=n, replace=False).astype(np.int64)
    if len(excl):  # r-th value not excluded
        r = r + np.searchsorted(excl - np.arange(len(excl)), r, side="right")
    return np.sort(r)


def draw_faults(space: SiteSpace, s: PlannedStratum, n: int, seed: int,
                kinds: Sequence[str] = ("flip",), round_: int = 0,
                exclude: Iterable[int] = ()) -> list[tuple[int, Fault, int]]:
    """``n`` distinct faults ``(k, Fault, kernel)`` of stratum ``s`` drawn uniformly without
    replacement, skipping stratum-local numbers ``exclude`` (for top-ups)."""
    K = len(kinds)
    ks = _choose(stratum_rng(seed, s.key, round_), s.N, n,
                 np.fromiter(exclude, dtype=np.int64))
    if not len(ks):
        return []
    idx, bits = space.decode(s.layer, ks // K, s.bit, s.kernel, s.bits, s.target)
    kern = np.atleast_1d(space.layer(s.layer, s.target).kernel_of(idx))
    return [(int(k), Fault(s.target, s.layer, int(i), (int(b),), kinds[int(k) % K]), int(c))
            for k, i, b, c in zip(ks.tolist(), idx.tolist(), bits.tolist(), kern.tolist(),
                                  strict=True)]


def _critical_counts(space: SiteSpace, layer: str, target: str, kinds: Sequence[str],
                     cache: dict) -> np.ndarray:
    """counts[kind, bit, kernel]: elements whose fault moves the stored value by more than
    the tensor's largest magnitude (or makes it non-finite) — the data-aware proxy."""
    key = (layer, target)
    if key in cache:
        return cache[key]
    ls = space.layer(layer, target)
    tensor = getattr(space.modules[layer], target).detach().float().cpu()
    fmt = space.bound_format(layer, target, tensor)
    base = fmt.decode(fmt.encode(tensor))
    limit = base.abs().max().item()
    kern = np.asarray(ls.kernel_of(np.arange(ls.numel)), dtype=np.int64)
    counts = np.zeros((len(kinds), fmt.bits, ls.n_kernels))
    with torch.no_grad():
        for ki, kind in enumerate(kinds):
            for b in range(fmt.bits):
                faulty = apply_bits(tensor, 1 << b, kind, fmt)
                crit = ~torch.isfinite(faulty) | ((faulty - base).abs() > limit)
                counts[ki, b] = np.bincount(kern, weights=crit.reshape(-1).numpy(),
                                            minlength=ls.n_kernels)
    cache[key] = counts
    return counts


def data_aware_p(space: SiteSpace, s: PlannedStratum, kinds: Sequence[str],
                 cache: dict | None = None) -> float:
    """Prior of stratum ``s`` from the weights' bits: the fraction of its faults that move
    a weight by more than the layer's largest magnitude (or to inf/NaN), clamped to
    ``[P_FLOOR, 1 - P_FLOOR]``."""
    counts = _critical_counts(space, s.layer, s.target, kinds, {} if cache is None else cache)
    bits = list(_bits_of(space, s.bit, s.bits))
    sub = counts[:, bits, :] if s.kernel is None else counts[:, bits, s.kernel:s.kernel + 1]
    p = float(sub.sum()) / max(s.N, 1)
    return min(max(p, P_FLOOR), 1.0 - P_FLOOR)


def _user_strata(space: SiteSpace, items: Sequence[dict[str, Any]]) -> list[PlannedStratum]:
    out: list[PlannedStratum] = []
    for i, d in enumerate(items):
        bad = set(d) - {"layer", "target", "bit", "bits", "kernel", "n"}
        if bad or "layer" not in d:
            what = f"unknown field {sorted(bad)[0]!r}" if bad else "missing 'layer'"
            raise ConfigError(f"strata[{i}]: {what} (fields: layer, target, bit, bits, "
                              f"kernel, n)")
        bits = d.get("bits")
        bits = bits if bits is None or isinstance(bits, str) else tuple(int(b) for b in bits)
        target = str(d.get("target", "weight"))
        ls = space.layer(str(d["layer"]), target)
        sites = space.population(ls.name, d.get("bit"), d.get("kernel"), bits, target)
        resolved = _bits_of(space, None, bits)
        st = PlannedStratum("", ls.name, target, d.get("bit"),
                            None if bits is None else resolved, d.get("kernel"), sites, 0, 0,
                            0.5)
        st.key = _key(st)
        for prev in out:
            if prev.layer == st.layer and prev.target == st.target and _overlap(space, prev, st):
                raise ConfigError(f"strata[{i}]: overlaps stratum {prev.key!r}")
        out.append(st)
    return out


def _bits_of(space: SiteSpace, bit: int | None, bits: Sequence[int] | str | None
             ) -> tuple[int, ...]:
    """Bit positions of a stratum (validated by ``space.population`` beforehand)."""
    if bit is not None:
        return (int(bit),)
    if bits is None:
        return tuple(range(space.fmt.bits))
    if isinstance(bits, str):
        return tuple(space.fmt.bits_of_field(bits))
    return tuple(sorted({int(b) for b in bits}))


def _overlap(space: SiteSpace, a: PlannedStratum, b: PlannedStratum) -> bool:
    ba, bb = set(_bits_of(space, a.bit, a.bits)), set(_bits_of(space, b.bit, b.bits))
    return bool(ba & bb) and (a.kernel is None or b.kernel is None or a.kernel == b.kernel)


def _key(s: PlannedStratum) -> str:
    parts = [s.target, s.layer]
    if s.bit is not None:
        parts.append(f"bit={s.bit}")
    if s.bits is not None:
        parts.append("bits=" + ",".join(map(str, s.bits)))
    if s.kernel is not None:
        parts.append(f"kernel={s.kernel}")
    return ":".join(parts)


def make_plan(model: nn.Module, config: PlanConfig, predictor: Any = None) -> Plan:
    """Strata, populations, priors and sample sizes of ``config`` for ``model``; with
    ``sampling="stratified"`` the strata are split by the criticality ``predictor``
    (:func:`flipguard.criticality.campaign.stratify_plan`)."""
    kinds = config.kinds
    space = SiteSpace(model, targets=config.targets, layers=config.layers, fmt=config.fmt)
    if not space.layers:
        raise ConfigError(f"targets: no Conv/ConvTranspose/Linear {'/'.join(config.targets)} "
                          "tensors to inject in the model")
    if config.user_strata is not None:
        strata = _user_strata(space, config.user_strata)
    else:
        by = config.strata.split(",")
        if "kernel" in by and config.layers is None:  # default: first and last target layers
            names = space.names
            space = SiteSpace(model, targets=config.targets, layers=[names[0], names[-1]],
                              fmt=config.fmt)
        raw = space.strata(by=[b for b in by if b != "network"])
        strata = [PlannedStratum(r.key, r.layer, r.target, r.bit, r.bits, r.kernel,
                                 r.population, 0, 0, 0.5) for r in raw]
    cache: dict = {}
    for s in strata:
        ls = space.layer(s.layer, s.target)
        s.bit_list = _bits_of(space, s.bit, s.bits)
        s.kernel_numel = ls.kernel_numel
        s.elements = ls.numel if s.kernel is None else ls.kernel_numel
        s.kinds = tuple(kinds)
        s.N = s.sites * len(kinds)
        s.p = (data_aware_p(space, s, kinds, cache) if config.p == "data-aware"
               else float(config.p))
    if config.strata == "network":
        N = sum(s.N for s in strata)
        p = sum(s.p * s.N for s in strata) / N if config.p == "data-aware" else float(config.p)
        p = min(max(p, P_FLOOR), 1 - P_FLOOR)
        n = leveugle_n(N, config.error, config.confidence, p, config.rounding)
        for s, k in zip(strata, allocate(n, [s.N for s in strata]), strict=True):
            s.n = k
    else:
        user = config.user_strata or ()
        for i, s in enumerate(strata):
            fixed = user[i].get("n") if i < len(user) else None
            if fixed is not None:
                if not 0 <= int(fixed) <= s.N:
                    raise ConfigError(f"strata[{i}].n: expected 0..{s.N}, got {fixed}")
                s.n = int(fixed)
            else:
                s.n = leveugle_n(s.N, config.error, config.confidence, s.p, config.rounding)
    if config.sampling == "stratified":
        from flipguard.criticality.campaign import stratify_plan

        return stratify_plan(Plan(config, strata, space), predictor)
    return Plan(config, strata, space)
