"""The report of a run directory: collect its plain-data :class:`~flipguard.report.
ReportContext` (run, detector scores and examples, campaign counts and CFR tables, later-stage
results, calibration of the criticality predictor) and write it (:func:`build_report`).

Every stored result is checked against the run as it is now before it is shown: the campaign
store's model/data/task fingerprints against the run's campaign engine, ``hardening.json``
(made from that campaign) and ``ra.json`` against theirs. A result made for another model,
threshold or dataset is withheld, and its section says so instead of showing the old
detector's numbers.

>>> ctx = collect("runs/demo", criterion="accuracy-drop:0.01")   # doctest: +SKIP
>>> [r["layer"] for r in ctx.campaign.tables["layer"]][:1]        # doctest: +SKIP
['encoder.0']
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipguard.campaign import CampaignStore, PlanConfig, cfr_table, store_path
from flipguard.campaign.analysis import classify_store
from flipguard.campaign.stats import DEFAULT_METHOD, METHODS, stratified
from flipguard.detect import reconstruct
from flipguard.errors import ConfigError, FlipguardError
from flipguard.inject import CRITICAL, parse_criterion
from flipguard.layers import is_layer
from flipguard.report import CampaignData, DetectorData, ReportContext, render_report
from flipguard.study import predictors
from flipguard.study.engines import RunEngineFactory
from flipguard.study.rundir import Run, load_run
from flipguard.study.stores import campaign_factory, fingerprints_or_none, mismatch

__all__ = ["EXTRAS", "GROUPINGS", "build_report", "calibration_data", "campaign_data",
           "collect", "detector_data", "layer_types"]

GROUPINGS: dict[str, tuple[str, ...]] = {
    "network": (), "layer": ("layer",), "bit": ("bit",), "field": ("field",),
    "layer_bit": ("layer", "bit"), "layer_kernel": ("layer", "kernel"),
}
"""CFR tables computed for the report (name -> ``by`` of ``cfr_table``)."""
EXTRAS: dict[str, tuple[str, ...]] = {"hardening": ("hardening.json",),
                                      "resiliency": ("ra.json", "resiliency.json")}
"""Later-stage results: ``ctx.extras[name]`` from the first of these ``RUN/`` files present."""
RERUN = {"campaign": "re-run `flipguard campaign run RUN --fresh`",
         "hardening": "re-run `flipguard harden RUN`", "resiliency": "re-run `flipguard ra RUN`"}


def layer_types(model: torch.nn.Module) -> dict[str, str]:
    """Layers (:func:`flipguard.layers.is_layer`) in network order: ``{"0": "Linear"}``.

    >>> layer_types(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    {'0': 'Linear'}
    """
    return {name: type(m).__name__ for name, m in model.named_modules() if name and is_layer(m)}


def _pick_examples(labels: np.ndarray, types: Sequence[str], k: int) -> list[int]:
    """Up to ``k`` test images: the first of each defect type, then normal ones."""
    first: dict[str, int] = {}
    for i, t in enumerate(types):
        first.setdefault(t, i)
    defects = [i for t, i in first.items() if t != "good" and labels[i]]
    goods = [i for i, y in enumerate(labels) if not y]
    n_good = min(len(goods), max(1, k - len(defects)), k)
    return sorted((defects[: k - n_good] + goods[:n_good])[:k])


def detector_data(run: Run, notes: list[str], examples: int = 6) -> DetectorData | None:
    """Scores of every test image and ``examples`` example maps; None (with a note) when the
    dataset cannot be loaded or the run is not a detector."""
    if run.task_kind != "detection":
        return None
    try:
        ds = run.load_data()
    except (FlipguardError, OSError) as exc:
        notes.append(f"Detector figures omitted: {str(exc).splitlines()[0]}")
        return None
    scorer = run.scorer
    recon = reconstruct(run.model, ds.test)
    maps = scorer.maps(ds.test, recon)
    scores = scorer.reduce(maps).numpy().astype(np.float64)
    labels = np.asarray(ds.test_labels, dtype=np.int64)
    idx = _pick_examples(labels, ds.test_types, examples) if examples > 0 else []
    sel = torch.as_tensor(idx, dtype=torch.long)
    imgs = ds.test[sel].permute(0, 2, 3, 1).numpy()
    imgs = imgs[..., 0] if imgs.shape[-1] == 1 else imgs
    masks = None if ds.test_masks is None else ds.test_masks[sel, 0].numpy()
    titles = [f"{ds.test_types[i]} · score {scores[i]:.3g}" for i in idx]
    return DetectorData(scores, labels, run.threshold, list(ds.test_types), imgs,
                        maps[sel, 0].numpy(), masks, titles)


def campaign_data(store: CampaignStore, criterion: str, method: str = DEFAULT_METHOD,
                  notes: list[str] | None = None) -> CampaignData:
    """Counts, per-stratum progress/margins and the :data:`GROUPINGS` CFR tables of an open
    campaign store."""
    definition = store.definition
    plan = dict(definition.get("plan", {}))
    conf = float(plan.get("confidence", 0.99))
    counts = store.counts()
    strata = store.strata()
    records: list = []
    if counts["done"] and store.get_meta("golden") is not None:
        records = classify_store(store, criterion)
    elif counts["done"] and notes is not None:
        notes.append(f"{store.path}: executed faults but no golden reference recorded; "
                     "rates omitted")
    tables = {}
    if records:
        def cached(_store: Any, _criterion: str) -> list:
            return records

        tables = {name: cfr_table(store, by=by, criterion=criterion, method=method,
                                  classify=cached) for name, by in GROUPINGS.items()}
    done = Counter(pf.stratum for pf, _ in records)
    crit = Counter(pf.stratum for pf, cls in records if cls in CRITICAL)
    rows = []
    for s in strata:
        e = stratified([(s.N, done[s.key], crit[s.key])], conf, method)
        rows.append({"key": s.key, "layer": s.layer, "target": s.target, "N": s.N,
                     "planned": s.n, "done": done[s.key], "critical": crit[s.key],
                     "cfr": e.p, "ci_low": e.ci[0], "ci_high": e.ci[1], "margin": e.margin})
    return CampaignData(criterion, method, conf, str(plan.get("fmt", "fp32")), plan,
                        int(definition.get("population") or sum(s.N for s in strata)),
                        counts["planned"], counts["done"], rows, tables,
                        int(store.get_meta("rounds", 0) or 0))


def calibration_data(run_path: Path, camp: CampaignData | None) -> dict[str, Any] | None:
    """Predicted vs observed criticality per predicted class of the executed faults
    (``calibration_table`` under the report's criterion, at the plan's confidence); None
    without classified results. A uniform campaign's faults are classified by the run's
    cached predictor (built on first use, on the campaign engine's images); when it cannot
    be built the dict holds ``error`` instead of ``rows`` (the report still renders)."""
    if camp is None or not camp.tables:  # no executed fault or no golden reference
        return None
    strat = camp.plan.get("sampling", "uniform") == "stratified"
    out: dict[str, Any] = {"criterion": camp.criterion, "confidence": camp.confidence,
                           "source": "substrata" if strat else "predictor"}
    try:
        predictor = None
        if not strat:
            with CampaignStore(store_path(run_path)) as store:
                eng = dict(store.definition.get("engine", {}))
            if "run" not in eng:
                raise ConfigError(f"the campaign engine ({eng.get('factory', 'unknown')}) "
                                  "is not a run directory's; no predictor to calibrate")
            # this run directory (the engine's path may be relative to another cwd)
            predictor = predictors.predictor_for_run(
                run_path, eng.get("images"), camp.criterion,
                targets=camp.plan.get("targets", ["weight"]), fmt=camp.fmt,
                kinds=PlanConfig.from_dict(camp.plan).kinds, data_dir=eng.get("data_dir"))
        out["rows"] = predictors.calibration_table(run_path, camp.criterion, camp.confidence,
                                                   predictor)
    except Exception as exc:  # an optional section must never break the report
        msg = str(exc).splitlines()[0] if str(exc) else ""
        out["error"] = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return out


def _extras(run_path: Path, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, files in EXTRAS.items():
        f = next((run_path / n for n in files if (run_path / n).is_file()), None)
        if f is not None:
            try:
                out[name] = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                notes.append(f"{f}: not readable JSON ({str(exc).splitlines()[0]}); "
                             f"the {name} section is omitted")
    return out


def _differs(what: str, recorded: Any, current: dict[str, str], where: Path) -> str | None:
    """Why ``recorded`` fingerprints (of a result file) do not match ``current``."""
    if not isinstance(recorded, dict):
        return None
    bad = [k for k, v in current.items() if recorded.get(k) not in (None, v)]
    if not bad:
        return None
    return f"{where} was made for another {' and '.join(bad)} than this run's; {RERUN[what]}"


def _withhold(ctx: ReportContext, run: Run, store: CampaignStore | None) -> None:
    """Drop the stored results that do not describe ``run`` as it is now (see module
    docstring), recording why in ``ctx.withheld``."""
    current = {"model": run.model_fingerprint()}
    if store is not None:
        fps = fingerprints_or_none(campaign_factory(run.path, store))
        why = mismatch(store, fps or current)
        if why is not None:
            ctx.withheld["campaign"] = f"{why}; {RERUN['campaign']}"
        elif fps is None:
            ctx.notes.append(f"{store.path}: checked against the run's model only (its data "
                             "could not be loaded to compare the evaluated images and task)")
        current = fps or current
    h, where = ctx.extras.get("hardening"), run.path / EXTRAS["hardening"][0]
    if isinstance(h, dict) and "campaign" in ctx.withheld:
        ctx.withheld["hardening"] = f"{where} was made from that campaign; {RERUN['hardening']}"
    elif isinstance(h, dict):
        why = _differs("hardening", h.get("fingerprints"), current, where)
        if why is not None:
            ctx.withheld["hardening"] = why
    r = ctx.extras.get("resiliency")
    if isinstance(r, dict) and isinstance(r.get("source"), dict) and "run" in r["source"]:
        n = r.get("n_images")
        fps = fingerprints_or_none(RunEngineFactory(str(run.path), images=n or None,
                                             fmt=str(r.get("format", "fp32"))))
        why = _differs("resiliency", r.get("fingerprints"), fps or {"model": current["model"]},
                       run.path / EXTRAS["resiliency"][0])
        if why is not None:
            ctx.withheld["resiliency"] = why
    for what in ("hardening", "resiliency"):
        if what in ctx.withheld:
            ctx.extras.pop(what, None)


def collect(run_dir: str | Path, criterion: str = "accuracy-drop:0.01",
            method: str = DEFAULT_METHOD, *, kernel_layers: Sequence[str] | None = None,
            bit_layers: Sequence[str] | None = None, examples: int = 6) -> ReportContext:
    """Load everything the report shows from a run directory (see module docstring)."""
    parse_criterion(criterion)
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    run = load_run(run_dir)
    ctx = ReportContext(run_path=run.path, config=run.config.model_dump(),
                        metrics=dict(run.metrics), layer_types=layer_types(run.model),
                        kernel_layers=None if kernel_layers is None else tuple(kernel_layers),
                        bit_layers=None if bit_layers is None else tuple(bit_layers))
    ctx.detector = detector_data(run, ctx.notes, examples)
    ctx.extras = _extras(run.path, ctx.notes)
    path = store_path(run.path)
    if path.is_file():
        with CampaignStore(path) as store:
            _withhold(ctx, run, store)
            if "campaign" not in ctx.withheld:
                ctx.campaign = campaign_data(store, criterion, method, ctx.notes)
    else:
        _withhold(ctx, run, None)
    calibration = calibration_data(run.path, ctx.campaign)
    if calibration is not None:
        ctx.extras["calibration"] = calibration
    if ctx.campaign is not None:
        for opt, chosen in (("kernel-layers", ctx.kernel_layers), ("bit-layers", ctx.bit_layers)):
            have = {r["layer"] for r in ctx.campaign.tables.get("layer_kernel", [])}
            missing = [n for n in chosen or () if n not in have]
            if missing:
                raise ConfigError(f"{opt}: {missing[0]!r} has no executed faults; expected "
                                  f"one of {', '.join(ctx.layer_order(have)) or '(none)'}")
    return ctx


def build_report(run_dir: str | Path, criterion: str = "accuracy-drop:0.01",
                 out: str | Path | None = None, *, method: str = DEFAULT_METHOD,
                 kernel_layers: Sequence[str] | None = None,
                 bit_layers: Sequence[str] | None = None, examples: int = 6) -> Path:
    """Build the reliability report of a run directory; returns the HTML path.

    ``out`` defaults to ``RUN/report.html``; the Markdown goes beside it and the CSV/figure
    files to ``<out without suffix>/``. ``kernel_layers``/``bit_layers`` choose the layers of
    the per-kernel figures and of the per-layer bit panels. A partial campaign is flagged;
    a run without a campaign gets the detector sections and a note.

    >>> build_report("runs/demo", criterion="any-flip").name   # doctest: +SKIP
    'report.html'
    """
    ctx = collect(run_dir, criterion, method, kernel_layers=kernel_layers,
                  bit_layers=bit_layers, examples=examples)
    return render_report(ctx, out)
