"""Criticality-stratified sampling as a plan type of campaigns: every planned stratum is split
into sub-strata by a predictor's class (keys ``<stratum>:crit=<class>``); round 0 audits
each with ``min(N_h, AUDIT)`` faults, round 1 draws the allocation planned from the audit
among the other faults (planned with class rates calibrated on the audit of every stratum,
:func:`calibrated_priors`; the store's meta ``calibration`` records them), and further
rounds (:func:`refine_stratified`) top up and end with a closing round
(:func:`flipguard.campaign.topup.plan_round`; the store's meta ``closed`` lists the strata
that had theirs). The CFR of the rounds is estimated without bias across them
(:mod:`flipguard.campaign.sequential`, :func:`substrata_estimate`).

The predictor is any object with ``classes(layer, bit, kernel, bits, target, kinds)`` (one
class per stratum-local fault), e.g. :class:`flipguard.criticality.Predictor`.

>>> history(500, {0: [30, 1], 2: [40, 2], 1: [100, 3]}).rounds
(1, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flipguard.campaign.analysis import classify_store
from flipguard.campaign.grouping import group_label, group_map, parse_groups
from flipguard.campaign.planner import Plan, PlanConfig, PlannedFault, PlannedStratum, make_plan
from flipguard.campaign.sequential import History, sequential_estimate
from flipguard.campaign.stats import Estimate, t_value
from flipguard.campaign.substrata import (
    CERTIFIED,
    CLASS_LABELS,
    allocate,
    class_label,
    class_prior,
    draw,
    plan_rates,
    substratum_key,
)
from flipguard.campaign.topup import plan_round
from flipguard.errors import ConfigError
from flipguard.faults import Fault
from flipguard.inject import CRITICAL

__all__ = ["AUDIT", "StratifiedPlan", "calibrated_priors", "history", "refine_stratified",
           "stratify_plan", "substrata_estimate"]

AUDIT = 30
"""Faults audited in every sub-stratum in round 0 (all of them when fewer)."""


def predictor_labels(predictor: Any) -> Sequence[str]:
    """The class labels of ``predictor`` (the default classes when it names none)."""
    return getattr(predictor, "labels", CLASS_LABELS)


def sub_label(predictor: Any, config: PlanConfig, h: int) -> str:
    """Label of the sub-stratum of class ``h`` under the plan's class groups."""
    if int(h) == CERTIFIED or config.class_groups is None:
        return class_label(predictor_labels(predictor), h)
    return group_label(int(h), parse_groups(config.class_groups), predictor_labels(predictor))


@dataclass
class StratifiedPlan(Plan):
    """A plan whose strata are criticality sub-strata; ``faults()`` draws within classes."""

    predictor: Any = field(default=None, repr=False)
    parents: list[PlannedStratum] = field(default_factory=list, repr=False)
    classes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def draw(self, s: PlannedStratum, n: int, round_: int = 0,
             exclude: Sequence[int] = ()) -> list[tuple[int, Fault, int]]:
        """``n`` faults ``(k, Fault, kernel)`` of sub-stratum ``s`` (uniform, seeded)."""
        assert self.space is not None and s.parent is not None and s.crit is not None
        kk, jj = draw(self.classes[s.parent], s.crit, n, self.config.seed, s.key, round_,
                      exclude)
        K = len(s.kinds)
        idx, bits = self.space.decode(s.layer, jj // K, s.bit, s.kernel, s.bits, s.target)
        kern = np.atleast_1d(self.space.layer(s.layer, s.target).kernel_of(idx))
        return [(int(k), Fault(s.target, s.layer, int(i), (int(b),), s.kinds[int(j) % K]),
                 int(c)) for k, j, i, b, c in zip(kk.tolist(), jj.tolist(), idx.tolist(),
                                                  bits.tolist(), kern.tolist(), strict=True)]

    def faults(self, start_id: int = 0) -> list[PlannedFault]:
        out: list[PlannedFault] = []
        for s in self.strata:
            out += [PlannedFault(start_id + len(out) + i, s.key, k, f, kern)
                    for i, (k, f, kern) in enumerate(self.draw(s, s.n))]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        cfg, by_parent = self.config, {}
        for s in self.strata:
            by_parent.setdefault(s.parent, []).append(s)
        rows = []
        for par in self.parents:
            subs = by_parent.get(par.key, [])
            N = [s.N for s in subs]
            n0 = [s.n for s in subs]
            known = [s.N if s.crit == CERTIFIED else s.n for s in subs]  # census: exact
            more = allocate(N, [s.p for s in subs], cfg.error, cfg.confidence, AUDIT, n0=known)
            rows.append({"key": par.key, "N": par.N, "uniform_n": par.n,
                         "stratified_n": int(sum(n0) + more.sum()),
                         "certified": sum(s.N for s in subs if s.crit == CERTIFIED),
                         "classes": {sub_label(self.predictor, cfg, s.crit): s.N
                                     for s in subs}})
        d.update(sampling="stratified", parents=rows,
                 uniform_total=sum(r["uniform_n"] for r in rows),
                 predicted_total=sum(r["stratified_n"] for r in rows),
                 certified_total=sum(r["certified"] for r in rows))
        return d


def stratify_plan(plan: Plan, predictor: Any) -> StratifiedPlan:
    """Split every stratum of ``plan`` into criticality sub-strata (``n`` = the audit).

    A predictor with a ``certified(layer, target, index, bit, kind)`` method (bool per fault,
    e.g. :class:`flipguard.campaign.certified.CertifiedPredictor`) moves the faults it proves
    harmless into the :data:`~flipguard.campaign.substrata.CERTIFIED` sub-stratum: known
    exactly, never drawn, so only each stratum's uncertified remainder is sampled. With
    ``plan.config.class_groups`` the classes of a group form one sub-stratum, keyed by the
    group's lowest class, its prior the size-weighted mean of its classes' priors (those of
    ``plan.config.class_priors`` when given, else the fixed class priors)."""
    if predictor is None:
        raise ConfigError("sampling: 'stratified' needs a run directory (the predictor "
                          "evaluates the run's images)")
    assert plan.space is not None
    subs: list[PlannedStratum] = []
    classes: dict[str, np.ndarray] = {}
    certified = getattr(predictor, "certified", None)
    groups, priors = plan.config.class_groups, plan.config.class_priors
    gmap = None if groups is None else group_map(parse_groups(groups))
    for s in plan.strata:
        cls = predictor.classes(s.layer, s.bit, s.kernel, s.bits, s.target, s.kinds)
        prior: dict[int, float] = {}  # a group's prior; a class's own otherwise
        if gmap is not None:
            cls, prior = _grouped(np.asarray(cls), gmap, groups, priors)
        K, nb = len(s.kinds), len(s.bit_list)
        elem, rest = np.divmod(np.arange(cls.size), nb * K)
        index = (elem if s.kernel is None else
                 plan.space.layer(s.layer, s.target).kernel_elements(s.kernel, elem))
        kern = np.asarray(plan.space.layer(s.layer, s.target).kernel_of(index), np.int64)
        bit = np.asarray(s.bit_list, np.int64)[rest // K]
        if certified is not None:
            cls = _with_certified(cls, certified, s, index, bit, rest % K)
        classes[s.key] = cls
        nk = int(kern.max()) + 1 if kern.size else 1
        code = ((cls.astype(np.int64) * K + rest % K) * 64 + bit) * nk + kern
        uniq, cnt = np.unique(code, return_counts=True)
        for h in np.unique(cls).tolist():
            sel = (uniq // (nk * 64 * K)) == h
            rows = tuple((int(u // (nk * 64) % K), int(u // nk % 64), int(u % nk), int(c))
                         for u, c in zip(uniq[sel].tolist(), cnt[sel].tolist(), strict=True))
            N = int(cnt[sel].sum())
            subs.append(PlannedStratum(
                substratum_key(s.key, h), s.layer, s.target, s.bit, s.bits, s.kernel, N, N,
                0 if h == CERTIFIED else min(N, AUDIT), prior.get(int(h), class_prior(h, priors)),
                s.bit_list, s.elements, s.kernel_numel, s.kinds, crit=h, parent=s.key, counts=rows))
    return StratifiedPlan(plan.config, subs, plan.space, predictor, list(plan.strata), classes)


def _grouped(cls: np.ndarray, gmap: np.ndarray, text: str,
             priors: Sequence[float] | None = None) -> tuple[np.ndarray, dict[int, float]]:
    """Classes mapped to their group's lowest class, and each group's prior (the
    size-weighted mean of its classes' priors)."""
    if cls.size and int(cls.max()) >= len(gmap):
        raise ConfigError(f"class-groups: {text!r} covers classes 0..{len(gmap) - 1}, the "
                          f"predictor gives class {int(cls.max())}")
    cnt = np.bincount(cls.astype(np.int64), minlength=len(gmap))
    prior: dict[int, float] = {}
    for g in np.unique(gmap).tolist():
        members = np.flatnonzero(gmap == g)
        n = int(cnt[members].sum())
        if n:
            prior[g] = float(sum(cnt[m] * class_prior(int(m), priors) for m in members) / n)
    return gmap[cls.astype(np.int64)], prior


def _with_certified(cls: np.ndarray, certified: Any, s: PlannedStratum, index: np.ndarray,
                    bit: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """``cls`` with the faults ``certified`` proves harmless set to ``CERTIFIED``."""
    cls = np.asarray(cls).astype(np.uint8)
    if (cls == CERTIFIED).any():
        raise ConfigError(f"predictor: class {CERTIFIED} is reserved for certified faults")
    sure = np.zeros(cls.size, bool)
    for ki, name in enumerate(s.kinds):
        sel = np.flatnonzero(kind == ki)
        sure[sel] = np.asarray(certified(s.layer, s.target, index[sel], bit[sel], name), bool)
    return np.where(sure, np.uint8(CERTIFIED), cls)


def _observed(store: Any, criterion: str) -> dict[str, dict[int, list[int]]]:
    """Per sub-stratum key and round: ``[n, k]`` of the executed faults."""
    out: dict[str, dict[int, list[int]]] = {}
    for pf, cls in classify_store(store, criterion):
        v = out.setdefault(pf.stratum, {}).setdefault(int(pf.round), [0, 0])
        v[0] += 1
        v[1] += cls in CRITICAL
    return out


def history(N: int, by_round: dict[int, Any], prior: float = 0.0,
            classes: Sequence[str] | None = None) -> History:
    """:class:`~flipguard.campaign.sequential.History` of ``N`` faults from per-round
    counts: ``by_round[r]`` is ``[n, k]``, or (with ``classes``) a ``{class: count}`` mapping
    whose ``classes`` count as critical. Round 0 is the audit; ``fill`` is the rate seen.

    >>> history(500, {0: [30, 1], 2: [40, 2], 1: [100, 3]}).rounds
    (1, 2)
    """
    def nk(v: Any) -> tuple[int, int]:
        if classes is None:
            return int(v[0]), int(v[1])
        return int(sum(v.values())), int(sum(v.get(c, 0) for c in classes))

    counts = {int(r): nk(v) for r, v in by_round.items()}
    n0, k0 = counts.pop(0, (0, 0))
    later = sorted((r, a, b) for r, (a, b) in counts.items() if a > 0)
    n_all, k_all = n0 + sum(a for _, a, _ in later), k0 + sum(b for _, _, b in later)
    return History(int(N), n0, k0, tuple(r for r, _, _ in later), tuple(a for _, a, _ in later),
                   tuple(b for _, _, b in later), k_all / n_all if n_all else 0.5, float(prior))


def calibrated_priors(subs: Sequence[PlannedStratum], obs: dict[str, dict[int, list[int]]],
                      priors: Sequence[float] | None = None
                      ) -> dict[int, tuple[float, int, int]]:
    """Per predicted class: ``(rate, n, k)`` with the rate the class's audit pooled over
    every stratum, ``(k + 1/2) / (n + 1)`` (Jeffreys), or the class prior where nothing of
    the class was audited (``priors``: the plan's, default the fixed ones). Allocation plans
    with these rates (the estimates never depend on them).

    >>> s = [PlannedStratum("a:crit=4", "a", "weight", None, None, None, 100, 100, 30, 0.95,
    ...                     crit=4, parent="a")]
    >>> calibrated_priors(s, {"a:crit=4": {0: [30, 0]}})
    {4: (0.016129032258064516, 30, 0)}
    """
    pooled: dict[int, list[int]] = {}
    for sub in subs:
        if sub.crit == CERTIFIED:  # known, not predicted
            continue
        n0, k0 = obs.get(sub.key, {}).get(0, [0, 0])
        v = pooled.setdefault(int(sub.crit), [0, 0])
        v[0] += n0
        v[1] += k0
    return {h: ((k + 0.5) / (n + 1.0) if n else class_prior(h, priors), n, k)
            for h, (n, k) in sorted(pooled.items())}


def refine_stratified(store: Any, model: Any, predictor: Any, criterion: str,
                      max_rounds: int = 3) -> int:
    """Next round of a stratified campaign: round 1 draws the allocation planned from the
    audit; later rounds top up each stratum and end with its closing round
    (:func:`~flipguard.campaign.topup.plan_round`, forced at round ``max_rounds + 1``).
    Returns the number of faults added (0 once every stratum is closed)."""
    config = PlanConfig.from_dict(store.definition["plan"])
    plan = stratify_plan(make_plan(model, config), predictor)
    _check_same_substrata(plan, store)
    rounds = int(store.get_meta("rounds", 0))
    closed = set(store.get_meta("closed", []))
    if rounds > max_rounds:
        return 0
    obs, done_k = _observed(store, criterion), store.done_ks()
    start, new = store.next_fault_id(), []
    groups: dict[str, list[PlannedStratum]] = {}
    for s in plan.strata:
        groups.setdefault(s.parent, []).append(s)
    calib = calibrated_priors(plan.strata, obs, config.class_priors)
    for parent, subs in groups.items():
        if parent in closed:
            continue
        hists = [_known(s.N) if s.crit == CERTIFIED else history(s.N, obs.get(s.key, {}), s.p)
                 for s in subs]
        priors = [calib.get(int(s.crit), (0.0,))[0] for s in subs]
        N = np.array([h.N for h in hists])
        n0, k0 = np.array([h.n0 for h in hists]), np.array([h.k0 for h in hists])
        n, k = np.array([sum(h.n) for h in hists]), np.array([sum(h.k) for h in hists])
        if (n0 + n >= N).all():
            closed.add(parent)
            continue
        if rounds == 0:  # the allocation round, planned from the audit
            more = allocate(N, plan_rates(n0, k0, priors), config.error,
                            config.confidence, AUDIT, None, n0)
        else:
            more, closing = plan_round(hists, plan_rates(n0 + n, k0 + k, priors),
                                       config.error, config.confidence,
                                       last=rounds + 1 > max_rounds)
            if closing:
                closed.add(parent)
        for s, m in zip(subs, more.tolist(), strict=True):
            if m > 0:
                drawn = plan.draw(s, m, rounds + 1, done_k.get(s.key, ()))
                new += [PlannedFault(start + len(new) + i, s.key, kk, f, kern, rounds + 1)
                        for i, (kk, f, kern) in enumerate(drawn)]
    meta: dict[str, Any] = {"closed": sorted(closed), "calibration": {
        sub_label(predictor, config, h): {"prior": class_prior(h, config.class_priors),
                                          "audited": n, "critical": k, "rate": p}
        for h, (p, n, k) in calib.items()}}
    if new:
        meta["rounds"] = rounds + 1
    store.add_planned(new, meta=meta)
    return len(new)


def _known(N: int) -> History:
    """History of a certified sub-stratum (or cell): every fault known, none critical."""
    return History(int(N), int(N), 0, fill=0.0)


def _check_same_substrata(plan: StratifiedPlan, store: Any) -> None:
    """Refuse to extend a store whose sub-strata the predictor (or its certificates) no
    longer reproduces: the draws of later rounds would not match the store's."""
    stored = {s.key: s.N for s in store.strata()}
    now = {s.key: s.N for s in plan.strata}
    if stored and stored != now:
        bad = next(k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k))
        raise ConfigError(f"{getattr(store, 'path', 'store')}: sub-stratum {bad!r} has "
                          f"{stored.get(bad, 0)} faults in the store but {now.get(bad, 0)} "
                          f"now: the predictor or certificates changed since the plan")


def substrata_estimate(cells: Sequence[tuple[Any, int]], per: dict, first: dict,
                       classes: Sequence[str], confidence: float,
                       rounds: dict | None = None) -> Estimate:
    """CFR rows' estimate over sub-strata cells ``(stratum, N_c)``: ``per[key][cls]`` counts
    all executed faults of the cell, ``first[key][cls]`` those of the audit round and
    ``rounds[key][r][cls]`` those of round ``r`` (0 = the audit). With ``rounds`` the
    estimator is unbiased across all rounds (:mod:`flipguard.campaign.sequential`; a cell
    is a domain of its sub-stratum, post-stratified per round); without, the rounds after the
    audit are pooled (exact only with a single one). ``var`` is the variance estimate,
    ``n_eff`` the size whose binomial variance matches the margin; ``n`` counts simulated
    faults only (a certified cell is known, not sampled)."""
    out = []
    for s, N in cells:
        if getattr(s, "crit", None) == CERTIFIED:
            out.append(_known(N))
            continue
        if rounds is not None:
            out.append(history(N, rounds.get(s.key, {}), s.p, classes))
            continue
        n_all, k_all = sum(per[s.key].values()), sum(per[s.key][c] for c in classes)
        n0, k0 = sum(first[s.key].values()), sum(first[s.key][c] for c in classes)
        more = ((1,), (n_all - n0,), (k_all - k0,)) if n_all > n0 else ((), (), ())
        out.append(History(N, n0, k0, *more, k_all / n_all if n_all else 0.5, s.p))
    e = sequential_estimate(out, confidence, "clopper-pearson")
    t = t_value(confidence)
    n_eff = e.p * (1 - e.p) / (e.margin / t) ** 2 if e.margin > 0 else float("inf")
    known = sum(N for s, N in cells if getattr(s, "crit", None) == CERTIFIED)
    return Estimate(e.p, e.var, e.margin, e.ci, e.n - known, e.k, e.N, n_eff)  # n: simulated


