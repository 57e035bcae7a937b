"""The run's persistent predictor calibration, and the class groups it chooses.

Every stratified campaign of a run leaves its predicted-vs-observed counts per class (its
executed faults, any round) in ``RUN/criticality/calibration.json``, keyed by what the
predictor's classes mean (model, data, task, criterion, format, targets, fault model) and,
within that, by campaign plan (a campaign run again replaces its own counts: nothing is
counted twice). The next stratified plan of the same kind plans with the pooled rates
``(k + 1/2) / (n + 1)`` and, with ``--class-groups auto``, samples classes whose rates do not
differ enough to pay for separate sub-strata as one (:func:`flipguard.campaign.grouping.
choose_groups`). The grouping is frozen into the plan before anything is drawn, so the
estimates stay unbiased and the same seed gives the same faults.

>>> from flipguard.study.calibration import CALIBRATION_FILE
>>> CALIBRATION_FILE
'criticality/calibration.json'
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flipguard.campaign.grouping import choose_groups, groups_text, parse_groups
from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.stats import interval
from flipguard.campaign.store import CampaignStore, store_path
from flipguard.campaign.stratified import AUDIT, stratify_plan
from flipguard.campaign.substrata import (
    CERTIFIED,
    CLASS_LABELS,
    CLASS_PRIORS,
    check_class_priors,
)
from flipguard.errors import ConfigError
from flipguard.fileio import replacing
from flipguard.study.predictors import calibration_table

__all__ = ["CALIBRATION_FILE", "PRIOR_CONFIDENCE", "Calibration", "calibration_key",
           "class_groups_option", "class_priors_option", "load_calibration",
           "record_calibration", "resolve_calibrated"]

CALIBRATION_FILE = "criticality/calibration.json"
_VERSION = 1
PRIOR_CONFIDENCE = 0.9
"""Level of the interval a calibrated class prior is taken from (:meth:`Calibration.priors`)."""


@dataclass(frozen=True)
class Calibration:
    """Pooled ``(n, k)`` per predicted class over ``campaigns`` earlier campaigns."""

    counts: tuple[tuple[int, int], ...]
    campaigns: int

    @property
    def faults(self) -> int:
        return sum(n for n, _ in self.counts)

    def rates(self) -> dict[int, float]:
        """Rate to plan with per class: Jeffreys ``(k + 1/2) / (n + 1)``, the class prior
        where no fault of the class was observed.

        >>> Calibration(((100, 0), (0, 0), (10, 5), (0, 0), (0, 0)), 1).rates()[0]
        0.0049504950495049506
        """
        return {h: (k + 0.5) / (n + 1.0) if n else CLASS_PRIORS[h]
                for h, (n, k) in enumerate(self.counts)}

    def priors(self, confidence: float = PRIOR_CONFIDENCE) -> tuple[float, ...]:
        """Cautious class priors: per class the value closest to 1/2 in the Clopper–Pearson
        interval (``confidence``) of its calibrated rate, the fixed prior where no fault of
        the class was observed. A prior only shapes allocation and round weights: set too
        high it costs faults, too low it risks the margin, never the interval's validity.

        >>> c = Calibration(((9825, 0), (0, 0), (797, 5), (633, 185), (1193, 1193)), 1)
        >>> [round(v, 4) for v in c.priors()]
        [0.0003, 0.02, 0.0131, 0.3235, 0.9975]
        """
        out = []
        for h, (n, k) in enumerate(self.counts):
            if not n:
                out.append(CLASS_PRIORS[h])
                continue
            lo, hi = interval(k, n, confidence, "clopper-pearson")
            out.append(min(max(0.5, lo), hi))
        return check_class_priors([min(max(v, 1e-6), 1 - 1e-6) for v in out])


def calibration_key(factory: Any, cfg: PlanConfig) -> str:
    """What a class means: the predictor's inputs (fingerprints) and the plan's options."""
    key = {"fp": factory.fingerprints(), "criterion": cfg.criterion, "fmt": cfg.fmt,
           "targets": list(cfg.targets), "kinds": list(cfg.kinds), "version": _VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": _VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            raise ValueError("no 'entries' object")
        for entry in data["entries"].values():
            for rec in entry["campaigns"].values():
                if len(rec["classes"]) != len(CLASS_LABELS):
                    raise ValueError("'classes' needs one [n, k] pair per class")
                [(int(n), int(k)) for n, k in rec["classes"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: expected flipguard's calibration JSON ({exc}); "
                          f"remove it to start the calibration afresh") from None
    return data


def load_calibration(run: str | Path, key: str) -> Calibration | None:
    """The pooled calibration of ``key`` in the run (None when nothing was recorded)."""
    entry = _read(Path(run) / CALIBRATION_FILE)["entries"].get(key)
    if not entry or not entry["campaigns"]:
        return None
    recs = list(entry["campaigns"].values())
    counts = tuple((sum(int(r["classes"][h][0]) for r in recs),
                    sum(int(r["classes"][h][1]) for r in recs))
                   for h in range(len(CLASS_LABELS)))
    return Calibration(counts, len(recs))


def record_calibration(run: str | Path, store: CampaignStore, factory: Any, cfg: PlanConfig,
                       predictor: Any) -> Path:
    """Write the store's predicted-vs-observed counts into the run's calibration file
    (atomically; the store's earlier counts are replaced, and so are those of a campaign
    of the same plan with other class priors: its seeded draws overlap, and counting them
    twice would make the calibrated priors bolder than their interval says)."""
    rows = calibration_table(store, cfg.criterion, predictor=predictor)
    path = Path(run) / CALIBRATION_FILE
    data = _read(path)
    entry = data["entries"].setdefault(calibration_key(factory, cfg), {
        "criterion": cfg.criterion, "fmt": cfg.fmt, "campaigns": {}})
    plan = store.definition.get("plan")
    name = replace(PlanConfig.from_dict(plan), class_priors=None).digest() if plan \
        else str(store_path(run))
    entry["campaigns"][name] = {
        "classes": [[int(r["n"]), int(r["critical"])] for r in rows]}
    with replacing(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    return path


def resolve_calibrated(run: str | Path, cfg: PlanConfig, factory: Any, predictor: Any,
                       fresh: bool = False, groups: bool = False, priors: bool = False
                       ) -> tuple[PlanConfig, list[str]]:
    """``cfg`` with the class priors (``priors``: ``--class-priors calibrated``) and class
    groups (``groups``: ``--class-groups auto``) the run's calibration gives, and the notes
    saying which. The resumed store and the calibration are read once for both.

    A campaign being resumed keeps the priors and groups it was planned with. Without a
    calibration the plan keeps the fixed class priors and groups nothing (the fixed priors
    are not evidence). Otherwise the priors are :meth:`Calibration.priors` and the groups
    the grouping with the smallest predicted campaign at the calibrated rates. Both are
    frozen into the plan before anything is drawn (round weights are fixed before each
    round), so the estimates stay unbiased."""
    if cfg.sampling != "stratified" or not (priors and cfg.class_priors is None or
                                            groups and cfg.class_groups is None):
        return cfg, []
    resumed = _resumed_plan(run, fresh)
    calib = None if resumed is not None else load_calibration(run, calibration_key(factory, cfg))
    notes = []
    if priors and cfg.class_priors is None:
        cfg, note = _priors_from(cfg, resumed, calib)
        notes.append(note)
    if groups and cfg.class_groups is None:
        cfg, note = _groups_from(cfg, resumed, calib, factory, predictor)
        notes.append(note)
    return cfg, notes


def _priors_from(cfg: PlanConfig, resumed: dict[str, Any] | None, calib: Calibration | None
                 ) -> tuple[PlanConfig, str]:
    """The class priors of :func:`resolve_calibrated` and their note."""
    if resumed is not None:
        stored = resumed.get("class_priors")
        return replace(cfg, class_priors=None if stored is None else tuple(stored)), (
            f"class priors: {_priors_text(stored)} (as the campaign being resumed)")
    if calib is None:
        return cfg, "class priors: fixed (no calibration of this run's predictor yet)"
    priors = calib.priors()
    return replace(cfg, class_priors=priors), (
        f"class priors: {_priors_text(priors)} (calibrated on {calib.faults:,} faults of "
        f"{calib.campaigns} campaign(s), the cautious end of each class's "
        f"{PRIOR_CONFIDENCE:.0%} interval; fixed: {_priors_text(CLASS_PRIORS)})")


def _groups_from(cfg: PlanConfig, resumed: dict[str, Any] | None, calib: Calibration | None,
                 factory: Any, predictor: Any) -> tuple[PlanConfig, str]:
    """The class groups of :func:`resolve_calibrated` and their note."""
    if resumed is not None:
        stored = resumed.get("class_groups")
        return replace(cfg, class_groups=stored), (
            f"class groups: {stored or 'none'} (as the campaign being resumed)")
    if calib is None:
        return cfg, "class groups: none (auto: no calibration of this run's predictor yet)"
    plan = stratify_plan(make_plan(factory.model(), cfg), predictor)
    sizes: dict[str, dict[int, int]] = {}
    for s in plan.strata:
        if s.crit != CERTIFIED:
            sizes.setdefault(str(s.parent), {})[int(s.crit)] = s.N
    best, table = choose_groups(list(sizes.values()), calib.rates(), cfg.error,
                                cfg.confidence, AUDIT)
    text = groups_text(best)
    finest = groups_text(tuple((h,) for h in range(len(CLASS_LABELS))))
    note = (f"class groups: {text} (auto, calibrated on {calib.faults:,} faults of "
            f"{calib.campaigns} campaign(s): at those rates {table[text]:,} faults predicted "
            f"vs {table[finest]:,} with every class apart)")
    return replace(cfg, class_groups=None if text == finest else text), note


def _priors_text(priors: Any) -> str:
    """The priors as ``--class-priors`` takes them back (round-trip precision)."""
    return "fixed" if priors is None else ",".join(repr(float(v)) for v in priors)


def _resumed_plan(run: str | Path, fresh: bool) -> dict[str, Any] | None:
    """The plan of the stratified campaign a run would resume (None: a new campaign)."""
    path = store_path(run)
    if fresh or not path.exists():
        return None
    with CampaignStore(path) as store:
        plan = store.definition.get("plan", {})
    return plan if plan.get("sampling") == "stratified" else {}


def class_priors_option(text: str) -> tuple[tuple[float, ...] | None, bool]:
    """CLI ``--class-priors``: ``(priors, calibrated)`` from ``calibrated`` | ``fixed`` |
    five comma-separated rates.

    >>> class_priors_option("calibrated"), class_priors_option("0.001,0.01,0.1,0.5,0.9")
    ((None, True), ((0.001, 0.01, 0.1, 0.5, 0.9), False))
    """
    t = text.strip().lower()
    if t in ("calibrated", "fixed"):
        return None, t == "calibrated"
    return check_class_priors(t.split(",")), False


def class_groups_option(text: str) -> tuple[str | None, bool]:
    """CLI ``--class-groups``: ``(groups, auto)`` from ``auto`` | ``none`` | ``0-2,3,4``.

    >>> class_groups_option("auto"), class_groups_option("0-2,3-4")
    ((None, True), ('0-2,3-4', False))
    """
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None, t == "auto"
    return groups_text(parse_groups(t)), False

