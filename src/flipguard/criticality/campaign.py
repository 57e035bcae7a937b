"""Criticality-stratified campaigns: the glue between the predictor / stratified sampling and
:mod:`flipguard.campaign` (plan, audit and allocation rounds, CFR rows, calibration).

A ``--sampling stratified`` plan splits every planned stratum into sub-strata by predicted
class (keys ``<stratum>:crit=<class>``); round 0 audits each with ``min(N_h, AUDIT)`` faults,
round 1 draws the allocation planned from the audit among the other faults, and further
rounds (``campaign run --refine``: sequential mode) top up until the margin is reached.

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
from flipguard.criticality.stratified import (
    Cell,
    allocate,
    cell_interval,
    draw,
    estimate,
    plan_rates,
    split_key,
    substratum_key,
)
from flipguard.errors import ConfigError
from flipguard.faults import Fault

__all__ = ["AUDIT", "StratifiedPlan", "calibration_table", "predictor_for_factory",
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
    from flipguard.campaign.runner import RunEngineFactory
    from flipguard.inject import DetectionTask

    factory = RunEngineFactory(str(run), images=images, fmt=fmt, data_dir=data_dir)
    r, inputs, labels = factory._parts()
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


def _observed(store: Any, criterion: str) -> dict[str, list[int]]:
    """Per sub-stratum key: ``[n0, k0, n, k]`` (audit round, later rounds)."""
    from flipguard.campaign.analysis import classify_store

    out: dict[str, list[int]] = {}
    for pf, cls in classify_store(store, criterion):
        v = out.setdefault(pf.stratum, [0, 0, 0, 0])
        j = 0 if pf.round == 0 else 2
        v[j] += 1
        v[j + 1] += cls in _CRITICAL
    return out


def refine_stratified(store: Any, model: Any, criterion: str, max_rounds: int = 3) -> int:
    """Next round of a stratified campaign: round 1 draws the allocation planned from the
    audit; later rounds top up strata whose margin is still above the target (at most
    ``max_rounds + 1`` rounds). Returns the number of faults added."""
    from flipguard.campaign.planner import make_plan
    from flipguard.campaign.runner import RunEngineFactory

    config = PlanConfig.from_dict(store.definition["plan"])
    eng = store.definition.get("engine", {})
    factory = RunEngineFactory(eng["run"], eng.get("images"), eng.get("fmt", "fp32"),
                               eng.get("data_dir"))
    plan = make_plan(model, config, predictor=predictor_for_factory(factory, config))
    assert isinstance(plan, StratifiedPlan)
    rounds = int(store.get_meta("rounds", 0))
    if rounds > max_rounds:
        return 0
    obs, done_k = _observed(store, criterion), store.done_ks()
    start, new = store.next_fault_id(), []
    groups: dict[str, list[PlannedStratum]] = {}
    for s in plan.strata:
        groups.setdefault(s.parent, []).append(s)
    for subs in groups.values():
        v = np.array([obs.get(s.key, [0, 0, 0, 0]) for s in subs], dtype=np.int64)
        N = np.array([s.N for s in subs])
        cells = [Cell(int(a), b[2], b[3], b[0], b[1]) for a, b in zip(N, v, strict=True)]
        if rounds >= 1 and estimate(cells, config.confidence).margin <= config.error:
            continue
        n0 = np.array([s.n for s in subs])  # the audit round's size
        have = np.array([len(done_k.get(s.key, ())) for s in subs]) - n0
        target = allocate(N, plan_rates(v[:, 0] + v[:, 2], v[:, 1] + v[:, 3],
                                        [s.p for s in subs]),
                          config.error, config.confidence, AUDIT, have, n0)
        if rounds >= 1 and (target <= have).all():  # grow the widest sub-stratum
            width = [c.N * (lambda t: t[2] - t[1])(cell_interval(c, config.confidence))
                     if c.n0 + c.n < c.N else -1.0 for c in cells]
            h = int(np.argmax(width))
            target[h] = min(N[h] - n0[h], have[h] + max(1, int(np.ceil(0.25 * have[h]))))
        for s, t, h in zip(subs, target.tolist(), have.tolist(), strict=True):
            if t > h:
                drawn = plan.draw(s, t - h, rounds + 1, done_k.get(s.key, ()))
                new += [PlannedFault(start + len(new) + i, s.key, k, f, kern, rounds + 1)
                        for i, (k, f, kern) in enumerate(drawn)]
    if new:
        store.add_planned(new, meta={"rounds": rounds + 1})
    return len(new)


def substrata_estimate(cells: Sequence[tuple[Any, int]], per: dict, first: dict,
                       classes: Sequence[str], confidence: float) -> Estimate:
    """CFR rows' estimate over sub-strata cells ``(stratum, N_c)``: ``per[key][cls]`` counts
    all executed faults of the cell, ``first[key][cls]`` those of the audit round."""
    out = []
    for s, N in cells:
        n_all, k_all = sum(per[s.key].values()), sum(per[s.key][c] for c in classes)
        n0, k0 = sum(first[s.key].values()), sum(first[s.key][c] for c in classes)
        fill = k_all / n_all if n_all else 0.5
        out.append(Cell(N, n_all - n0, k_all - k0, n0, k0, fill))
    e = estimate(out, confidence, "clopper-pearson")
    t = t_value(confidence)
    var = (e.margin / t) ** 2
    n_eff = e.p * (1 - e.p) / var if var > 0 else float("inf")
    return Estimate(e.p, var, e.margin, e.ci, e.n, e.k, e.N, n_eff)


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
