"""Campaign planning: strata, Leveugle sample sizes, data-aware priors, seeded fault lists.

The population of a stratum is ``sites x kinds`` (a bit flip has one kind, stuck-at two:
stuck-at-0 and stuck-at-1, the no-op half included). Stratum-local fault ``j`` is site
``j // K`` of the stratum (see ``flipguard.faults.SiteSpace``) with kind ``kinds[j % K]``;
with ``stuck_at="effective"`` the population is the sites and fault ``j`` is site ``j`` with
the stuck value that changes its stored bit (:mod:`flipguard.campaign.conventions`). Each
stratum draws with its own ``numpy`` generator seeded by
``SeedSequence([seed, round, *sha256(key)])``, so adding or removing a stratum never changes
the faults of another.

>>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
>>> plan = make_plan(net, PlanConfig(strata="layer", error=0.05, confidence=0.95))
>>> plan.population, [s.n for s in plan.strata]
(1088, [231, 220])
>>> len(plan.faults()) == plan.total
True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from flipguard.campaign.conventions import (
    check_stuck_at,
    check_t,
    effective_counts,
    plan_t,
    sample_size,
)
from flipguard.campaign.grouping import groups_text, parse_groups
from flipguard.campaign.priors import P_FLOOR, data_aware_p
from flipguard.campaign.sampling import draw_faults, stratum_rng
from flipguard.campaign.stats import ROUNDINGS, allocate, check_confidence, check_error, check_p
from flipguard.campaign.substrata import check_class_priors
from flipguard.errors import ConfigError
from flipguard.faults import Fault, SiteSpace, get_format
from flipguard.inject.outcomes import parse_criterion

__all__ = ["FAULT_MODELS", "P_FLOOR", "SAMPLINGS", "STRATA", "Plan", "PlanConfig",
           "PlannedFault", "PlannedStratum", "data_aware_p", "draw_faults", "make_plan",
           "stratum_rng"]

FAULT_MODELS: dict[str, tuple[str, ...]] = {"bitflip": ("flip",),
                                             "stuck-at": ("stuck-at-0", "stuck-at-1")}
STRATA = ("network", "layer", "layer,bit", "layer,field", "layer,kernel", "layer,bit,kernel",
          "layer,field,kernel")
SAMPLINGS = ("uniform", "stratified")


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
    replaces ``strata`` when given. ``t``: ``"exact"`` normal quantile or ``"table"`` (two
    decimals, 2.58 at 99 %); ``stuck_at``: ``"all"`` (both stuck values, the no-op half
    included) or ``"effective"`` (only faults that change the stored bit);
    ``exclude_certified`` (stratified only): faults proven to change no decision form an
    exactly known sub-stratum and are never drawn (:mod:`flipguard.campaign.certified`);
    ``class_groups`` (stratified only, e.g. ``"0-2,3,4"``): predicted classes sampled as one
    sub-stratum (:mod:`flipguard.campaign.grouping`); ``class_priors`` (stratified only): one
    prior critical rate per predicted class instead of the fixed
    :data:`~flipguard.campaign.substrata.CLASS_PRIORS` (e.g. calibrated by earlier campaigns
    of the run); they shape the allocation and the round weights, never the validity of the
    estimates.

    >>> PlanConfig(strata="bit,layer", p="0.5").strata
    'layer,bit'
    >>> PlanConfig(confidence=0.99, t="table").sample_size(10**9)
    16641
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
    t: str = "exact"
    stuck_at: str = "all"
    exclude_certified: bool = False
    class_groups: str | None = None
    class_priors: tuple[float, ...] | None = None

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
        check_t(self.t)
        plan_t(self.confidence, self.t)
        if check_stuck_at(self.stuck_at) == "effective" and self.fault_model != "stuck-at":
            raise ConfigError("stuck-at: 'effective' needs --fault-model stuck-at")
        if self.sampling == "stratified" and (self.t, self.stuck_at) != ("exact", "all"):
            raise ConfigError("sampling: 'stratified' supports only --t exact and "
                              "--stuck-at all")
        if self.class_groups is not None:
            if self.sampling != "stratified":
                raise ConfigError("class-groups: predicted classes form sub-strata of "
                                  "criticality-stratified plans; use --sampling stratified")
            set_("class_groups", groups_text(parse_groups(self.class_groups)))
        if self.class_priors is not None:
            if self.sampling != "stratified":
                raise ConfigError("class-priors: the priors of predicted classes plan "
                                  "criticality-stratified campaigns; use --sampling stratified")
            set_("class_priors", check_class_priors(self.class_priors))
        if self.exclude_certified and self.sampling != "stratified":
            raise ConfigError("exclude-certified: certified faults form a sub-stratum of "
                              "criticality-stratified plans; use --sampling stratified")

    @property
    def kinds(self) -> tuple[str, ...]:
        return FAULT_MODELS[self.fault_model]

    @property
    def t_value(self) -> float:
        """The ``t`` of the sample-size formula (convention ``t`` at ``confidence``)."""
        return plan_t(self.confidence, self.t)

    def sample_size(self, N: int, p: float | None = None) -> int:
        """Leveugle ``n`` for a population ``N`` at this margin, confidence, ``t`` convention
        and rounding, with prior ``p`` (default: the configured number; 0.5 if data-aware)."""
        if p is None:
            p = self.p if isinstance(self.p, float) else 0.5
        return sample_size(N, self.error, self.confidence, p, self.rounding, self.t)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("layers", "targets", "user_strata", "class_priors"):
            d[k] = None if d[k] is None else list(d[k])
        if self.sampling == "uniform":  # uniform plans keep their digests
            del d["sampling"], d["criterion"]
        for k, default in (("t", "exact"), ("stuck_at", "all"),
                           ("exclude_certified", False), ("class_groups", None),
                           ("class_priors", None)):  # defaults
            if d[k] == default:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanConfig:
        d = dict(d)
        for k in ("layers", "targets", "user_strata", "class_priors"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (identifies a plan)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PlannedStratum:
    """One stratum: ``N`` = sites x kinds (sites when ``effective``: only the stuck-at faults
    that change the stored bit, per-kind populations in ``counts``), ``n`` planned faults,
    prior ``p``."""

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
    effective: bool = False  # stuck-at population without the no-op half

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("bits", "bit_list", "kinds"):
            d[k] = None if d[k] is None else list(d[k])
        if not d["effective"]:
            del d["effective"]
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
                "total": self.total, "t": self.config.t_value,
                "strata": [s.to_dict() for s in self.strata]}

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


def make_plan(model: nn.Module, config: PlanConfig) -> Plan:
    """Strata, populations, priors and Leveugle sample sizes of ``config`` for ``model`` (the
    uniform plan; other plan types build on it, see :mod:`flipguard.campaign.plan_types`)."""
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
        if config.stuck_at == "effective":
            s.effective, s.N = True, s.sites
            s.counts = effective_counts(space, s.layer, s.target, s.bit_list, s.kernel, kinds,
                                        cache)
        s.p = (data_aware_p(space, s, kinds, cache) if config.p == "data-aware"
               else float(config.p))
    if config.strata == "network":
        N = sum(s.N for s in strata)
        p = sum(s.p * s.N for s in strata) / N if config.p == "data-aware" else float(config.p)
        p = min(max(p, P_FLOOR), 1 - P_FLOOR)
        n = config.sample_size(N, p)
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
                s.n = config.sample_size(s.N, s.p)
    return Plan(config, strata, space)
