"""Campaigns of a run directory: plan with a time estimate, run (or resume) with probe,
refinement rounds and any backend, status, CFR tables and export — the run-directory side of
:mod:`flipguard.campaign`, which itself only knows plans, stores and engines.

>>> CampaignOptions().workers
1
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flipguard.campaign import (
    CampaignStore,
    PlanConfig,
    cfr_table,
    ensure_golden,
    export,
    open_campaign,
    probe_rate,
    refine,
    run_campaign,
    sampling_type,
    store_path,
)
from flipguard.campaign.conventions import population_note
from flipguard.campaign.ray_backend import require_ray
from flipguard.campaign.runner import execute_chunk
from flipguard.errors import ConfigError
from flipguard.layers import evenly_spaced
from flipguard.models import load_model
from flipguard.study.calibration import record_calibration, resolve_calibrated
from flipguard.study.engines import RunEngineFactory
from flipguard.study.predictors import predictor_for_factory
from flipguard.study.stores import check_run_store

__all__ = ["CampaignOptions", "CampaignEvents", "PlanSummary", "RunSummary", "StatusSummary",
           "campaign_status", "cfr_rows_of", "export_faults", "plan_campaign", "plan_model",
           "predictor_for", "run_study_campaign"]


@dataclass(frozen=True)
class CampaignOptions:
    """How to run a campaign: evaluated ``images``, ``workers`` / ``ray`` backend, at most
    ``limit`` faults, ``fresh`` store, ``refine`` rounds (always for stratified plans),
    ``chunk`` faults per engine batch, ``probe`` faults timed first, ``certify`` (skip
    the simulation of faults proven to change no decision), ``auto_groups`` (a stratified
    plan groups predicted classes as the run's calibration says pays) and ``auto_priors``
    (its class priors come from that calibration; both
    :func:`flipguard.study.calibration.resolve_calibrated`)."""

    images: int | None = None
    workers: int = 1
    ray: str | None = None
    limit: int | None = None
    fresh: bool = False
    refine: bool = False
    chunk: int = 32
    probe: int = 4
    certify: bool = False
    auto_groups: bool = False
    auto_priors: bool = False


@dataclass
class PlanSummary:
    """A plan as shown by ``campaign plan``: the plan dict, a time estimate and notes."""

    plan: dict[str, Any]
    estimate_s: float | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan, "estimate_s": self.estimate_s, "notes": list(self.notes)}


@dataclass
class RunSummary:
    """What ``campaign run`` did."""

    ran: int
    planned: int
    done: int
    seconds: float
    rate: float
    rounds: int = 0
    certified_pairs: float | None = None
    """With --certify: the share of (fault, image) pairs of the store not simulated."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StatusSummary:
    """Planned and executed faults per stratum of a store."""

    planned: int
    done: int
    population: int | None
    rounds: int
    plan: dict[str, Any] | None
    by_stratum: list[dict[str, Any]]
    path: str

    @property
    def pending(self) -> int:
        return self.planned - self.done

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pending": self.pending, "strata": len(self.by_stratum)}


@dataclass
class CampaignEvents:
    """Callbacks of :func:`run_study_campaign` (all optional): ``opened(store, counts)``,
    ``probed(seconds_per_fault, pending)``, ``progress(done, total)``, ``round(n, added)``."""

    opened: Callable[[CampaignStore, dict[str, int]], None] | None = None
    probed: Callable[[float, int], None] | None = None
    progress: Callable[[int, int], None] | None = None
    round: Callable[[int, int], None] | None = None


def predictor_for(factory: RunEngineFactory, cfg: PlanConfig) -> Any:
    """The criticality predictor a plan type needs (None for uniform plans)."""
    return predictor_for_factory(factory, cfg) if sampling_type(cfg.sampling).needs_predictor \
        else None


def _notes(cfg: PlanConfig, plan: Any) -> list[str]:
    notes = [population_note(cfg.fault_model, cfg.stuck_at)]
    if cfg.stuck_at == "effective":
        split = [sum(s.population_of(kind=k) for s in plan.strata) for k in cfg.kinds]
        notes.append(f"effective population: stuck-at-0 {split[0]:,} (stored 1s), "
                     f"stuck-at-1 {split[1]:,} (stored 0s)")
    return notes


def plan_campaign(run: str | Path, cfg: PlanConfig, images: int | None = None,
                  probe: int = 3, auto_groups: bool = False, auto_priors: bool = False
                  ) -> PlanSummary:
    """The plan of ``cfg`` for a run directory, with a time estimate from ``probe`` timed
    faults (one process); ``auto_groups``, ``auto_priors``: see :class:`CampaignOptions`."""
    factory = RunEngineFactory(str(run), images=images, fmt=cfg.fmt)
    predictor = predictor_for(factory, cfg)
    cfg, notes = resolve_calibrated(run, cfg, factory, predictor, groups=auto_groups,
                                    priors=auto_priors)
    plan = sampling_type(cfg.sampling).make(factory.model(), cfg, predictor)
    faults = plan.faults()
    per_fault = None
    sample = [faults[int(i)] for i in evenly_spaced(len(faults), probe)] if probe else []
    if sample:
        engine = factory()
        t0 = time.perf_counter()
        execute_chunk(engine, sample)
        per_fault = (time.perf_counter() - t0) / len(sample)
    d = plan.to_dict()
    total = d.get("predicted_total", plan.total)
    return PlanSummary(d, None if per_fault is None else per_fault * total,
                       _notes(cfg, plan) + notes)


def plan_model(spec: str, cfg: PlanConfig, input_shape: tuple[int, ...] | None = None
               ) -> PlanSummary:
    """The plan of ``cfg`` for any importable model ``pkg.module:factory`` (no run
    directory); with ``input_shape`` (C, H, W) the estimate is one forward pass per fault."""
    net = load_model(spec)
    plan = sampling_type(cfg.sampling).make(net, cfg, None)
    per_fault = None
    if input_shape:
        with torch.no_grad():
            t0 = time.perf_counter()
            net(torch.zeros((1, *input_shape)))
            per_fault = time.perf_counter() - t0
    return PlanSummary(plan.to_dict(), None if per_fault is None else per_fault * plan.total,
                       _notes(cfg, plan))


def run_study_campaign(run: str | Path, cfg: PlanConfig, opts: CampaignOptions,
                       events: CampaignEvents | None = None) -> RunSummary:
    """Run (or resume) the campaign of ``cfg`` on a run directory: open or create the store,
    record the golden reference, time ``opts.probe`` faults, run the pending faults on the
    chosen backend, then refinement rounds while the plan type asks for them."""
    ev = events or CampaignEvents()
    if opts.ray:
        require_ray()  # before the store is created and the probe runs
    factory = RunEngineFactory(str(run), images=opts.images, fmt=cfg.fmt, certify=opts.certify)
    predictor = predictor_for(factory, cfg)
    stratified = sampling_type(cfg.sampling).needs_predictor
    cfg, notes = resolve_calibrated(run, cfg, factory, predictor, opts.fresh,
                                    groups=opts.auto_groups, priors=opts.auto_priors)
    with open_campaign(run, cfg, factory, fresh=opts.fresh, predictor=predictor) as store:
        if opts.certify and not cfg.exclude_certified:  # only layers where faults repay it
            # (an --exclude-certified plan has every layer's certificates already)
            per_layer = Counter(pf.fault.layer for pf in store.planned())
            factory = replace(factory, certify_faults=tuple(sorted(per_layer.items())))
        engine = factory()
        ensure_golden(store, engine)
        counts = store.counts()
        if ev.opened:
            ev.opened(store, counts)
        left, ran, rounds = opts.limit, 0, 0
        k = min(opts.probe, left if left is not None else opts.probe)
        per = probe_rate(store, engine, k) if k else None
        if per is not None:
            c = store.counts()
            ran = c["done"] - counts["done"]
            left = None if left is None else left - ran
            pending = c["planned"] - c["done"]
            if ev.probed:
                ev.probed(per, pending if left is None else min(pending, left))
        t0 = time.perf_counter()
        try:
            while True:
                res = run_campaign(store, factory, engine=engine, workers=opts.workers,
                                   ray=opts.ray, limit=left, chunk=opts.chunk,
                                   progress=ev.progress)
                ran += res["ran"]
                if left is not None:
                    left -= res["ran"]
                if not (opts.refine or stratified) or store.pending(limit=1) or (
                        left is not None and left <= 0):
                    break
                added = refine(store, factory.model(), cfg.criterion, predictor)
                rounds += 1
                if ev.round:
                    ev.round(rounds, added)
                if not added:
                    break
        except BaseException:  # stopped (Ctrl-C, SIGTERM) or failed: keep what it learnt
            if stratified and store.counts()["done"] > counts["done"]:
                with suppress(Exception):
                    record_calibration(run, store, factory, cfg, predictor)
            raise
        c = store.counts()
        share = _certified_share(store) if opts.certify else None
        if stratified and ran:  # the run's calibration learns from every stratified campaign
            record_calibration(run, store, factory, cfg, predictor)
    dt = time.perf_counter() - t0
    return RunSummary(ran, c["planned"], c["done"], dt, ran / dt if dt > 0 else float("nan"),
                      rounds, share, notes)


def _certified_share(store: CampaignStore) -> float | None:
    """Share of the (fault, image) pairs of the executed faults that were certified."""
    cert = total = 0
    for _, out in store.results():
        n = int(out.get("n_certified") or 0)
        cert += n
        total += n + int(out.get("n_images") or 0)
    return cert / total if total else None


def campaign_status(run_or_store: str | Path) -> StatusSummary:
    """Planned and executed faults of a campaign (read-only: works on a finished store in a
    read-only directory)."""
    with CampaignStore(store_path(run_or_store)) as store:
        counts, strata, done_by = store.counts(), store.strata(), store.done_by_stratum()
        d = store.definition
        return StatusSummary(counts["planned"], counts["done"], d.get("population"),
                             int(store.get_meta("rounds", 0)), d.get("plan"),
                             [{"key": s.key, "N": s.N, "n": s.n, "done": done_by.get(s.key, 0)}
                              for s in strata], str(store.path))


def cfr_rows_of(run_or_store: str | Path, by: tuple[str, ...], criterion: str, method: str,
                confidence: float | None = None) -> list[dict[str, Any]]:
    """CFR rows of a campaign (see :func:`flipguard.campaign.cfr_table`); a run directory's
    store is first checked against the run as it is now (:func:`check_run_store`)."""
    with CampaignStore(store_path(run_or_store)) as store:
        check_run_store(run_or_store, store)
        return cfr_table(store, by=by, criterion=criterion, method=method,
                         confidence=confidence)


def export_faults(run_or_store: str | Path, fmt: str = "csv", out: str | Path | None = None
                  ) -> Path:
    """Write the executed faults with their raw outcomes (default ``RUN/faults.FMT``)."""
    path = store_path(run_or_store)
    target = Path(out) if out is not None else path.parent / f"faults.{fmt}"
    if target.is_dir():
        raise ConfigError(f"--out {target}: a folder; expected a file path")
    with CampaignStore(path) as store:
        return export(store, target, fmt)
