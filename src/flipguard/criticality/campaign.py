"""Criticality-stratified campaigns: the glue between the predictor / stratified sampling and
:mod:`flipguard.campaign` (plan, audit and allocation rounds, CFR rows, calibration).

A ``--sampling stratified`` plan splits every planned stratum into sub-strata by predicted
class (keys ``<stratum>:crit=<class>``); round 0 audits each with ``min(N_h, AUDIT)`` faults,
round 1 draws the allocation planned from the audit among the other faults, and further
rounds (``campaign run``: :func:`refine_stratified`) top up and end with a closing round
(:func:`flipguard.criticality.topup.plan_round`; the store's meta ``closed`` lists the
strata that had theirs). The CFR of the rounds is estimated without bias across them
(:mod:`flipguard.criticality.sequential`, :func:`substrata_estimate`).

>>> rows = calibration_table("runs/demo")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.campaign.planner import Plan, PlanConfig, PlannedFault, PlannedStratum
from flipguard.campaign.stats import Estimate, t_value, wilson
from flipguard.criticality.predictor import CLASS_LABELS, CLASS_PRIORS, Predictor
from flipguard.criticality.sequential import History, sequential_estimate
from flipguard.criticality.stratified import (
    allocate,
    draw,
    plan_rates,
    split_key,
    substratum_key,
)
from flipguard.criticality.topup import plan_round
from flipguard.errors import ConfigError
from flipguard.faults import Fault

__all__ = ["AUDIT", "StratifiedPlan", "calibration_table", "history", "predictor_for_factory",
           "predictor_for_run", "refine_stratified", "stratify_plan", "substrata_estimate"]

AUDIT = 30
"""Faults audited in every sub-stratum in round 0 (all of them when fewer)."""
_CRITICAL = ("sdc-critical", "non-finite")


def predictor_for_run(run: str | Path, images: int | None = None,
                      criterion: str = "accuracy-drop:0.01", *,
                      targets: Sequence[str] = ("weight",),
                      layers: Sequence[str] | None = None, fmt: str = "fp32",
                      kinds: Sequence[str] = ("flip",), data_dir: str | None = None,
                      max_images: int = 64, cache: bool = True) -> Predictor:
    """Predictor of a run directory on the images the campaign engine evaluates, cached in
    ``RUN/criticality/<digest>.pt`` (keyed by model, data and task fingerprints and options)."""
    from flipguard.inject import DetectionTask
    from flipguard.study.engines import RunEngineFactory

    factory = RunEngineFactory(str(run), images=images, fmt=fmt, data_dir=data_dir)
    parts = factory.parts()
    r, inputs, labels = parts.run, parts.inputs, parts.labels
    key = {"fp": factory.fingerprints(), "criterion": criterion, "targets": list(targets),
           "layers": None if layers is None else list(layers), "max_images": max_images,
           "kinds": list(kinds), "version": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(run) / "criticality" / f"{digest}.pt"
    if cache and path.is_file():
        return Predictor.load(path, r.model, layers=layers)
    pred = Predictor.build(r.model, inputs, DetectionTask(r.scorer.scores, r.threshold, labels),
                           criterion, targets=targets, layers=layers, fmt=fmt,
                           max_images=max_images, kinds=kinds)
    if cache:
        pred.save(path)
    return pred


def predictor_for_factory(factory: Any, config: PlanConfig) -> Predictor:
    """Predictor for a campaign of ``config`` run by a ``RunEngineFactory``."""
    if not hasattr(factory, "run"):
        raise ConfigError("sampling: 'stratified' needs a run directory (the predictor "
                          "evaluates the run's images)")
    return predictor_for_run(factory.run, factory.images, config.criterion,
                             targets=config.targets, layers=config.layers, fmt=config.fmt,
                             kinds=config.kinds, data_dir=getattr(factory, "data_dir", None))


@dataclass
class StratifiedPlan(Plan):
    """A plan whose strata are criticality sub-strata; ``faults()`` draws within classes."""

    predictor: Predictor | None = field(default=None, repr=False)
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
            more = allocate(N, [s.p for s in subs], cfg.error, cfg.confidence, AUDIT, n0=n0)
            rows.append({"key": par.key, "N": par.N, "uniform_n": par.n,
                         "stratified_n": int(sum(n0) + more.sum()),
                         "classes": {CLASS_LABELS[s.crit]: s.N for s in subs}})
        d.update(sampling="stratified", parents=rows,
                 uniform_total=sum(r["uniform_n"] for r in rows),
                 predicted_total=sum(r["stratified_n"] for r in rows))
        return d


def stratify_plan(plan: Plan, predictor: Predictor | None) -> StratifiedPlan:
    """Split every stratum of ``plan`` into criticality sub-strata (``n`` = the audit)."""
    if predictor is None:
        raise ConfigError("sampling: 'stratified' needs a run directory (the predictor "
                          "evaluates the run's images)")
    assert plan.space is not None
    subs: list[PlannedStratum] = []
    classes: dict[str, np.ndarray] = {}
    for s in plan.strata:
        cls = predictor.classes(s.layer, s.bit, s.kernel, s.bits, s.target, s.kinds)
        classes[s.key] = cls
        K, nb = len(s.kinds), len(s.bit_list)
        elem, rest = np.divmod(np.arange(cls.size), nb * K)
        index = (elem if s.kernel is None else
                 plan.space.layer(s.layer, s.target).kernel_elements(s.kernel, elem))
        kern = np.asarray(plan.space.layer(s.layer, s.target).kernel_of(index), np.int64)
        bit = np.asarray(s.bit_list, np.int64)[rest // K]
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
                min(N, AUDIT), CLASS_PRIORS[h], s.bit_list, s.elements, s.kernel_numel,
                s.kinds, crit=h, parent=s.key, counts=rows))
    return StratifiedPlan(plan.config, subs, plan.space, predictor, list(plan.strata), classes)


def _observed(store: Any, criterion: str) -> dict[str, dict[int, list[int]]]:
    """Per sub-stratum key and round: ``[n, k]`` of the executed faults."""
    from flipguard.campaign.analysis import classify_store

    out: dict[str, dict[int, list[int]]] = {}
    for pf, cls in classify_store(store, criterion):
        v = out.setdefault(pf.stratum, {}).setdefault(int(pf.round), [0, 0])
        v[0] += 1
        v[1] += cls in _CRITICAL
    return out


def history(N: int, by_round: dict[int, Any], prior: float = 0.0,
            classes: Sequence[str] | None = None) -> History:
    """:class:`~flipguard.criticality.sequential.History` of ``N`` faults from per-round
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


def refine_stratified(store: Any, model: Any, criterion: str, max_rounds: int = 3) -> int:
    """Next round of a stratified campaign: round 1 draws the allocation planned from the
    audit; later rounds top up each stratum and end with its closing round
    (:func:`~flipguard.criticality.topup.plan_round`, forced at round ``max_rounds + 1``).
    Returns the number of faults added (0 once every stratum is closed)."""
    from flipguard.campaign.planner import make_plan
    from flipguard.study.engines import RunEngineFactory

    config = PlanConfig.from_dict(store.definition["plan"])
    eng = store.definition.get("engine", {})
    factory = RunEngineFactory(eng["run"], eng.get("images"), eng.get("fmt", "fp32"),
                               eng.get("data_dir"))
    plan = make_plan(model, config, predictor=predictor_for_factory(factory, config))
    assert isinstance(plan, StratifiedPlan)
    rounds = int(store.get_meta("rounds", 0))
    closed = set(store.get_meta("closed", []))
    if rounds > max_rounds:
        return 0
    obs, done_k = _observed(store, criterion), store.done_ks()
    start, new = store.next_fault_id(), []
    groups: dict[str, list[PlannedStratum]] = {}
    for s in plan.strata:
        groups.setdefault(s.parent, []).append(s)
    for parent, subs in groups.items():
        if parent in closed:
            continue
        hists = [history(s.N, obs.get(s.key, {}), s.p) for s in subs]
        N = np.array([h.N for h in hists])
        n0, k0 = np.array([h.n0 for h in hists]), np.array([h.k0 for h in hists])
        n, k = np.array([sum(h.n) for h in hists]), np.array([sum(h.k) for h in hists])
        if (n0 + n >= N).all():
            closed.add(parent)
            continue
        if rounds == 0:  # the allocation round, planned from the audit
            more = allocate(N, plan_rates(n0, k0, [s.p for s in subs]), config.error,
                            config.confidence, AUDIT, None, n0)
        else:
            more, closing = plan_round(hists, plan_rates(n0 + n, k0 + k, [s.p for s in subs]),
                                       config.error, config.confidence,
                                       last=rounds + 1 > max_rounds)
            if closing:
                closed.add(parent)
        for s, m in zip(subs, more.tolist(), strict=True):
            if m > 0:
                drawn = plan.draw(s, m, rounds + 1, done_k.get(s.key, ()))
                new += [PlannedFault(start + len(new) + i, s.key, kk, f, kern, rounds + 1)
                        for i, (kk, f, kern) in enumerate(drawn)]
    meta = {"rounds": rounds + 1, "closed": sorted(closed)} if new else {"closed": sorted(closed)}
    store.add_planned(new, meta=meta)
    return len(new)


def substrata_estimate(cells: Sequence[tuple[Any, int]], per: dict, first: dict,
                       classes: Sequence[str], confidence: float,
                       rounds: dict | None = None) -> Estimate:
    """CFR rows' estimate over sub-strata cells ``(stratum, N_c)``: ``per[key][cls]`` counts
    all executed faults of the cell, ``first[key][cls]`` those of the audit round and
    ``rounds[key][r][cls]`` those of round ``r`` (0 = the audit). With ``rounds`` the
    estimator is unbiased across all rounds (:mod:`flipguard.criticality.sequential`; a cell
    is a domain of its sub-stratum, post-stratified per round); without, the rounds after the
    audit are pooled (exact only with a single one). ``var`` is the variance estimate,
    ``n_eff`` the size whose binomial variance matches the margin."""
    out = []
    for s, N in cells:
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
    return Estimate(e.p, e.var, e.margin, e.ci, e.n, e.k, e.N, n_eff)


def calibration_table(run_or_store: Any, criterion: str = "accuracy-drop:0.01",
                      confidence: float = 0.95,
                      predictor: Predictor | None = None) -> list[dict[str, Any]]:
    """Predicted vs observed criticality of a campaign's executed faults, one row per
    predicted class: ``class``, ``label``, ``predicted`` (prior), ``n``, ``critical``,
    ``observed`` rate and its Wilson ``ci``. A uniform campaign's faults are classified by
    ``predictor`` (default: the run's cached predictor)."""
    from flipguard.campaign.analysis import _open, classify_store

    store, opened = _open(run_or_store)
    try:
        records = classify_store(store, criterion)
        if records and split_key(records[0][0].stratum)[1] is not None:
            cls = np.array([split_key(pf.stratum)[1] for pf, _ in records], dtype=np.int64)
        else:
            if predictor is None:
                d = store.definition
                eng, plan = d.get("engine", {}), d.get("plan", {})
                predictor = predictor_for_run(
                    eng["run"], eng.get("images"), criterion,
                    targets=plan.get("targets", ["weight"]), fmt=plan.get("fmt", "fp32"),
                    kinds=PlanConfig.from_dict(plan).kinds, data_dir=eng.get("data_dir"))
            cls = predictor.class_of([pf.fault for pf, _ in records]).astype(np.int64)
        crit = np.array([c in _CRITICAL for _, c in records], dtype=bool)
    finally:
        if opened:
            store.close()
    rows = []
    for h, label in enumerate(CLASS_LABELS):
        sel = cls == h if len(records) else np.zeros(0, bool)
        n, k = int(sel.sum()), int(crit[sel].sum()) if len(records) else 0
        lo, hi = wilson(k, n, confidence)
        rows.append({"class": h, "label": label, "predicted": CLASS_PRIORS[h], "n": n,
                     "critical": k, "observed": k / n if n else None, "ci": [lo, hi]})
    return rows
