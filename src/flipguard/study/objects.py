"""`flipguard study ROOT --out DIR`: the whole workflow over every object (category) of an
MVTec-layout root, then the objects side by side.

Per object, in ``DIR/<object>/``: train → evaluate (``run/``, threshold from normal data
only) → campaign (``run/campaign.sqlite``) → CFR tables per layer / bit / kernel
(``cfr.json``) → hardening (``run/hardening.json``) → report (``run/report.html``). Each
stage records itself in ``DIR/<object>/stages.json`` when it is complete, so a killed study
resumes at the first unfinished stage of each object (the campaign itself resumes fault by
fault). Objects run one after another or ``workers`` at a time in processes (or on Ray);
the parent follows them through their ``stages.json`` files. At the end ``DIR/study.json``
holds per-object and aggregate rows and ``DIR/study.html`` the cross-object figures.

>>> StudyOptions().plan.error, STAGES[0]
(0.05, 'train')
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flipguard.campaign import PlanConfig, cfr_table
from flipguard.campaign.ray_backend import ray_map
from flipguard.errors import ConfigError, FlipguardError
from flipguard.fileio import atomic_write, json_clean
from flipguard.report.study_page import render_study
from flipguard.study.campaigns import CampaignOptions, run_study_campaign
from flipguard.study.detector import check_cv_folds, check_options, train_detector
from flipguard.study.hardening import harden_run
from flipguard.study.reports import build_report

__all__ = ["STAGES", "StudyOptions", "discover", "run_object", "run_study", "study_record"]

STAGES = ("train", "campaign", "cfr", "harden", "report")
GROUPINGS = {"network": (), "layer": ("layer",), "bit": ("bit",),
             "layer_kernel": ("layer", "kernel")}
STUDY_SCHEMA = "flipguard.study/1"


@dataclass(frozen=True)
class StudyOptions:
    """Options of every stage. ``train``: keyword arguments of
    :func:`flipguard.study.detector.train_detector` (size, model, train, score, threshold_fpr…);
    ``plan``: the campaign plan; ``campaign``: how it runs inside one object (its ``workers``
    apply within the object); ``budget``: hardening memory budget (None: skip hardening);
    ``workers``: objects processed at the same time."""

    categories: tuple[str, ...] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    plan: PlanConfig = field(default_factory=lambda: PlanConfig(strata="layer", error=0.05,
                                                                confidence=0.95))
    campaign: CampaignOptions = field(default_factory=CampaignOptions)
    criterion: str = "accuracy-drop:0.01"
    budget: float | None = 0.03
    workers: int = 1
    ray: str | None = None


def discover(root: Path, categories: Sequence[str] | None = None) -> list[tuple[str, Path,
                                                                               str | None]]:
    """``(name, data root, category)`` of each object: every sub-folder of ``root`` with
    ``train/good`` (an MVTec AD root), or ``root`` itself when it is one category."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: dataset root not found")
    if (root / "train" / "good").is_dir():
        found = [(root.name, root, None)]
    else:
        found = [(p.name, root, p.name) for p in sorted(root.iterdir())
                 if (p / "train" / "good").is_dir()]
    if not found:
        raise ConfigError(f"{root}: no category with train/good (MVTec layout expected)")
    if categories:
        names = {n for n, _, _ in found}
        missing = [c for c in categories if c not in names]
        if missing:
            raise ConfigError(f"--categories: {missing[0]!r} not found in {root} "
                              f"(found: {', '.join(sorted(names))})")
        found = [f for f in found if f[0] in categories]
    return found


def _stages(obj: Path) -> dict[str, Any]:
    try:
        return json.loads((obj / "stages.json").read_text())
    except (OSError, ValueError):
        return {}


def _mark(obj: Path, stage: str, **info: Any) -> None:
    st = _stages(obj)
    st[stage] = {"done": True, "at": time.time(), **info}
    atomic_write(obj / "stages.json", json.dumps(json_clean(st), indent=1) + "\n")


def _fail(obj: Path, stage: str, exc: BaseException) -> None:
    st = _stages(obj)
    st[stage] = {"done": False, "error": str(exc).splitlines()[0] if str(exc) else
                 type(exc).__name__, "at": time.time()}
    atomic_write(obj / "stages.json", json.dumps(json_clean(st), indent=1) + "\n")


def run_object(name: str, data: Path, category: str | None, out: Path,
               opts: StudyOptions) -> dict[str, Any]:
    """Every stage of one object, resuming after its last completed one; returns the
    object's study row (see :func:`study_record`)."""

    obj = Path(out) / name
    run = obj / "run"
    obj.mkdir(parents=True, exist_ok=True)
    stage = "train"
    try:
        if not _stages(obj).get("train", {}).get("done"):
            t0 = time.perf_counter()
            train_detector(data, run, category=category, **opts.train)
            _mark(obj, "train", seconds=time.perf_counter() - t0)
        stage = "campaign"
        if not _stages(obj).get("campaign", {}).get("done"):
            s = run_study_campaign(run, opts.plan, opts.campaign)
            if s.done < s.planned:
                raise FlipguardError(f"{run}: campaign stopped at {s.done}/{s.planned} faults")
            _mark(obj, "campaign", faults=s.done, seconds=s.seconds)
        stage = "cfr"
        if not _stages(obj).get("cfr", {}).get("done"):
            t0 = time.perf_counter()
            tables = {g: cfr_table(run, by=by, criterion=opts.criterion)
                      for g, by in GROUPINGS.items()}
            atomic_write(obj / "cfr.json", json.dumps(json_clean(tables), indent=1) + "\n")
            _mark(obj, "cfr", seconds=time.perf_counter() - t0)
        stage = "harden"
        if opts.budget is not None and not _stages(obj).get("harden", {}).get("done"):
            t0 = time.perf_counter()
            harden_run(run, budget=opts.budget, criterion=opts.criterion)
            _mark(obj, "harden", seconds=time.perf_counter() - t0)
        stage = "report"
        if not _stages(obj).get("report", {}).get("done"):
            t0 = time.perf_counter()
            build_report(run, criterion=opts.criterion)
            _mark(obj, "report", seconds=time.perf_counter() - t0)
    except (FlipguardError, OSError) as exc:
        _fail(obj, stage, exc)
    except Exception as exc:  # noqa: BLE001 - one object's crash must not stop the others
        _fail(obj, stage, exc)
        (obj / "error.txt").write_text(traceback.format_exc())
    return object_row(name, obj)


def object_row(name: str, obj: Path) -> dict[str, Any]:
    """The study row of one object from its files (whatever stages are done)."""
    st = _stages(obj)
    run = obj / "run"
    row: dict[str, Any] = {"name": name, "run": str(run), "stages": st}
    failed = [s for s, v in st.items() if not v.get("done")]
    row["status"] = "failed" if failed else (
        "complete" if all(st.get(s, {}).get("done") for s in STAGES if s != "harden")
        else "partial")
    for fname, key in (("metrics.json", "metrics"), ("hardening.json", "hardening")):
        try:
            row[key] = json.loads((run / fname).read_text())
        except (OSError, ValueError):
            row[key] = None
    try:
        tables = json.loads((obj / "cfr.json").read_text())
        row["network"] = (tables.get("network") or [None])[0]
    except (OSError, ValueError):
        row["network"] = None
    return row


def _tables(out: Path, names: Sequence[str]) -> dict[str, dict[str, list]]:
    tables: dict[str, dict[str, list]] = {g: {} for g in ("layer", "bit", "layer_kernel")}
    for n in names:
        try:
            t = json.loads((Path(out) / n / "cfr.json").read_text())
        except (OSError, ValueError):
            continue
        for g in tables:
            tables[g][n] = t.get(g, [])
    return tables


def _aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float | None]:
        v = [x for x in values if x is not None and math.isfinite(x)]
        if not v:
            return {"mean": None, "min": None, "max": None, "std": None}
        a = np.asarray(v)
        return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
                "std": float(a.std())}

    m = [r.get("metrics") or {} for r in rows]
    return {"objects": len(rows),
            "image_auroc": stats([x.get("image_auroc") for x in m]),
            "f1": stats([x.get("f1") for x in m]),
            "cfr": stats([(r.get("network") or {}).get("cfr") for r in rows]),
            "hardening_gain": stats([(r.get("hardening") or {}).get("relative_improvement")
                                     for r in rows])}


def study_record(root: Path, out: Path, names: Sequence[str], opts: StudyOptions
                 ) -> dict[str, Any]:
    """``study.json``: per-object rows, aggregates and the options."""
    rows = [object_row(n, Path(out) / n) for n in names]
    first_last: list[str] = []
    for r in rows:
        layer_rows = _tables(out, [r["name"]])["layer"].get(r["name"], [])
        if layer_rows:
            first_last = [layer_rows[0]["layer"], layer_rows[-1]["layer"]]
            break
    return {"schema": STUDY_SCHEMA, "root": str(root), "criterion": opts.criterion,
            "fmt": opts.plan.fmt, "kernel_layers": first_last, "categories": rows,
            "aggregate": _aggregate(rows),
            "options": {"plan": opts.plan.to_dict(), "campaign": asdict(opts.campaign),
                        "budget": opts.budget, "train": opts.train}}


def run_study(root: str | Path, out: str | Path, opts: StudyOptions,
              watch: Callable[[dict[str, dict[str, Any]]], None] | None = None
              ) -> dict[str, Any]:
    """Run every object (resuming), then write ``DIR/study.json`` and ``DIR/study.html``;
    returns the record. ``watch(stages_by_object)`` is called while objects run."""
    root, out = Path(root), Path(out)
    t = opts.train
    check_options(t.get("size", 128), t.get("resize", "stretch"), t.get("model"),
                  t.get("train"), t.get("score"), t.get("val_fraction", 0.1))
    check_cv_folds(t.get("cv_folds", 0))
    objects = discover(root, opts.categories)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _, _ in objects]

    def poll() -> None:
        if watch is not None:
            watch({n: _stages(out / n) for n in names})

    if opts.ray is not None:
        ray_map(run_object, [(n, d, c, out, opts) for n, d, c in objects], opts.ray,
                opts.workers, poll)
    elif opts.workers > 1:
        with ProcessPoolExecutor(opts.workers) as pool:
            futures = [pool.submit(run_object, n, d, c, out, opts) for n, d, c in objects]
            while not all(f.done() for f in futures):
                poll()
                time.sleep(1.0)
            for f in futures:
                f.result()
    else:
        for n, d, c in objects:
            run_object(n, d, c, out, opts)
            poll()
    poll()
    record = study_record(root, out, names, opts)
    atomic_write(out / "study.json", json.dumps(json_clean(record), indent=1) + "\n")
    render_study(record, _tables(out, names), out / "study.html")
    return record
