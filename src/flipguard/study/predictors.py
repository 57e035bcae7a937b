"""The criticality predictor of a run directory, cached, and its calibration against a
campaign's outcomes (predicted vs observed critical rate per class).

>>> from flipguard.study.predictors import PREDICTOR_DIR
>>> PREDICTOR_DIR
'criticality'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.campaign.analysis import classify_store, open_store
from flipguard.campaign.certified import CertifiedPredictor, certified_for
from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.stats import wilson
from flipguard.campaign.substrata import CLASS_LABELS, CLASS_PRIORS, split_key
from flipguard.criticality import Predictor
from flipguard.errors import ConfigError
from flipguard.inject import CRITICAL, parse_criterion
from flipguard.study.engines import RunEngineFactory, task_for

__all__ = ["PREDICTOR_DIR", "calibration_table", "predictor_for_factory", "predictor_for_run"]

PREDICTOR_DIR = "criticality"


def predictor_for_run(run: str | Path, images: int | None = None,
                      criterion: str = "accuracy-drop:0.01", *,
                      targets: Sequence[str] = ("weight",),
                      layers: Sequence[str] | None = None, fmt: str = "fp32",
                      kinds: Sequence[str] = ("flip",), data_dir: str | None = None,
                      max_images: int = 64, cache: bool = True) -> Predictor:
    """Predictor of a run directory on the images the campaign engine evaluates, cached in
    ``RUN/criticality/<digest>.pt`` (keyed by model, data and task fingerprints and options)."""

    factory = RunEngineFactory(str(run), images=images, fmt=fmt, data_dir=data_dir)
    parts = factory.parts()
    r, inputs, labels = parts.run, parts.inputs, parts.labels
    key = {"fp": factory.fingerprints(), "criterion": criterion, "targets": list(targets),
           "layers": None if layers is None else list(layers), "max_images": max_images,
           "kinds": list(kinds), "version": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(run) / PREDICTOR_DIR / f"{digest}.pt"
    if cache and path.is_file():
        return Predictor.load(path, r.model, layers=layers)
    pred = Predictor.build(r.model, inputs, task_for(r, labels),
                           criterion, targets=targets, layers=layers, fmt=fmt,
                           max_images=max_images, kinds=kinds)
    if cache:
        pred.save(path)
    return pred


def predictor_for_factory(factory: Any, config: PlanConfig) -> Predictor | CertifiedPredictor:
    """Predictor for a campaign of ``config`` run by a ``RunEngineFactory``; with
    ``config.exclude_certified`` wrapped with the certificates of every layer on the same
    images (``RUN/certificates/``, computed once on all cores), so the plan's certified
    sub-strata are the same at every later round."""
    if not hasattr(factory, "run"):
        raise ConfigError("sampling: 'stratified' needs a run directory (the predictor "
                          "evaluates the run's images)")
    pred = predictor_for_run(factory.run, factory.images, config.criterion,
                             targets=config.targets, layers=config.layers, fmt=config.fmt,
                             kinds=config.kinds, data_dir=getattr(factory, "data_dir", None))
    if not config.exclude_certified:
        return pred
    if not parse_criterion(config.criterion).by_decisions:
        raise ConfigError(f"exclude-certified: certificates prove decisions, but criterion "
                          f"{config.criterion} depends on scores; use a decision criterion")
    engine = replace(factory, certify=True, certify_faults=None)()
    if engine.certifier is None or engine.certifier.reason is not None:
        why = engine.certifier.reason if engine.certifier is not None else "no certifier"
        raise ConfigError(f"exclude-certified: nothing can be certified ({why})")
    return CertifiedPredictor(pred, engine.certifier, certified_for(config.criterion))


def calibration_table(run_or_store: Any, criterion: str = "accuracy-drop:0.01",
                      confidence: float = 0.95,
                      predictor: Predictor | None = None) -> list[dict[str, Any]]:
    """Predicted vs observed criticality of a campaign's executed faults, one row per
    predicted class: ``class``, ``label``, ``predicted`` (prior), ``n``, ``critical``,
    ``observed`` rate and its Wilson ``ci``. A uniform campaign's faults (and those of a
    stratified one whose classes were grouped) are classified by ``predictor`` (default: the
    run's cached predictor)."""
    store, opened = open_store(run_or_store)
    try:
        records = classify_store(store, criterion)
        grouped = store.definition.get("plan", {}).get("class_groups") is not None
        if records and split_key(records[0][0].stratum)[1] is not None and not grouped:
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
        crit = np.array([c in CRITICAL for _, c in records], dtype=bool)
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
