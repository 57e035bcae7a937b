"""``flipguard harden RUN``: plan protections from the run's campaign, prove them by paired
re-injection of the campaign's own faults, write ``RUN/hardening.json`` (and, with activation
clamping, the deployable ``RUN/hardened/`` run directory).

The campaign store must belong to the run as it is now (model, evaluated images, threshold,
scorer and format: :func:`flipguard.study.stores.check_campaign`); a store made before the
threshold or the model changed is refused instead of giving the old detector's numbers.
The mechanisms, planner and paired statistics are :mod:`flipguard.harden` (plain objects);
the result format is docs/hardening.md.

>>> HardenOptions(budget=0.05).budget, RESULT_FILE
(0.05, 'hardening.json')
>>> HardenOptions(budget=-1).validate()
Traceback (most recent call last):
flipguard.errors.ConfigError: --budget: expected a memory overhead fraction >= 0, got -1
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flipguard import __version__
from flipguard.campaign import CampaignStore, StoreError, cfr_table, store_path
from flipguard.errors import ConfigError
from flipguard.fileio import atomic_write, json_clean
from flipguard.harden import (
    HardeningError,
    HardeningPlan,
    PairedResult,
    Protection,
    clamped_layers,
    coverage_summary,
    default_clamp_layers,
    harden_model,
    improvement_curve,
    measure_input_bounds,
    open_clamps,
    paired_exposure,
    paired_reinjection,
    parse_schemes,
    plan_hardening,
    weight_bits,
)
from flipguard.inject import Engine, parse_criterion
from flipguard.layers import evenly_spaced
from flipguard.ra import parse_hardware
from flipguard.study.engines import RunEngineFactory
from flipguard.study.rundir import ModelSection, Run, build_model, save_run
from flipguard.study.stores import campaign_factory, check_campaign
from flipguard.study.trust import sign

__all__ = ["FACTORY", "RESULT_FILE", "SCHEMA", "HardenOptions", "HardeningResult",
           "build_hardened", "campaign_engines", "evaluate_protections", "harden_run",
           "save_hardened_run"]

SCHEMA = "flipguard.hardening/2"
RESULT_FILE = "hardening.json"
HARDENED_DIR = "hardened"
FACTORY = "flipguard.study.hardening:build_hardened"
"""Model factory of a saved hardened run (``RUN/hardened/config.json``)."""
LEGACY_FACTORIES = ("flipguard.harden.module:build_hardened",)
"""The name earlier versions gave the same factory (in hardened runs already written)."""
_FIX = "re-run `flipguard campaign run RUN --fresh` before hardening"

EngineFor = Callable[[nn.Module], Any]


@dataclass(frozen=True)
class HardenOptions:
    """What to harden and how: memory ``budget`` (fraction of the weight memory), ``schemes``
    (comma list or sequence; ``act`` = activation clamping), ``criterion``, ``policy`` for
    detected words, planner ``method``, the expected-improvement ``curve``, ``n_boot`` Monte
    Carlo draws and ``seed`` of the sign-flip test, ``clamp_images`` training images that
    set the clamps, and ``hardware`` exposure model for the whole-exposure view."""

    budget: float = 0.03
    schemes: str | tuple[str, ...] = "tmr,parity,ecc,range,invariant"
    criterion: str = "accuracy-drop:0.01"
    policy: str = "zero"
    method: str = "greedy"
    curve: bool = True
    n_boot: int = 20_000
    seed: int = 0
    clamp_images: int = 64
    hardware: str | None = None

    def names(self) -> list[str]:
        """The scheme names, in order."""
        raw = self.schemes.split(",") if isinstance(self.schemes, str) else self.schemes
        return [p.strip() for p in raw if p.strip()]

    def validate(self) -> tuple[tuple[str, ...], bool]:
        """One-line :class:`ConfigError` for a bad setting, before any work; returns the
        weight schemes and whether activation clamping is on."""
        b = self.budget
        if not isinstance(b, (int, float)) or not math.isfinite(b) or b < 0:
            shown = f"{b:g}" if isinstance(b, (int, float)) else repr(b)
            raise ConfigError(f"--budget: expected a memory overhead fraction >= 0, got {shown}")
        if self.clamp_images < 1:
            raise ConfigError(f"clamp_images: expected a positive count, got {self.clamp_images}")
        names = self.names()
        act = "act" in names
        wnames = [n for n in names if n != "act"]
        wschemes = tuple(parse_schemes(wnames)) if wnames or not act else ()
        parse_criterion(self.criterion)
        if self.hardware is not None:
            parse_hardware(self.hardware)  # a bad spec fails before any simulation
        return wschemes, act


@dataclass
class HardeningResult:
    """What ``harden_run`` decided and measured; :meth:`to_dict` is ``RUN/hardening.json``
    (schema ``flipguard.hardening/2``, docs/hardening.md)."""

    run: str
    options: HardenOptions
    fmt: str
    schemes: list[str]
    weight_bits: int
    plan: HardeningPlan
    paired: PairedResult
    coverage: list[dict[str, Any]]
    campaign: dict[str, Any]
    fingerprints: dict[str, str]
    clamps: dict[str, Any] | None = None
    act_bits: int = 0
    exposure: dict[str, Any] | None = None
    curve: list[dict[str, Any]] | None = None
    created: float = field(default_factory=time.time)

    @property
    def cost_bits(self) -> int:
        return self.plan.cost_bits + self.act_bits

    @property
    def overhead(self) -> float:
        return self.cost_bits / self.weight_bits

    def to_dict(self) -> dict[str, Any]:
        o, p = self.options, self.plan
        expected = {"cfr_before": p.expected_cfr_before, "cfr_after": p.expected_cfr_after,
                    "relative_improvement": p.expected_removed / p.expected_critical
                    if p.expected_critical > 0 else None}
        out = {"schema": SCHEMA, "run": self.run, "criterion": parse_criterion(o.criterion).text,
               "format": self.fmt, "schemes": self.schemes, "policy": o.policy,
               "method": o.method, "budget": float(o.budget),
               "budget_bits": int(float(o.budget) * self.weight_bits),
               "weight_bits": self.weight_bits, "cost_bits": self.cost_bits,
               "overhead": self.overhead, "reload_bits": p.reload_bits,
               "protections": [{**q.to_dict(), "label": q.label} for q in p.protections],
               "table": p.table, "activation_clamps": self.clamps, **self.paired.to_dict(),
               "coverage": self.coverage, "exposure": self.exposure, "expected": expected,
               "campaign": self.campaign, "fingerprints": self.fingerprints,
               "curve": self.curve, "flipguard_version": __version__, "created": self.created}
        return json_clean(out)


def campaign_engines(factory: RunEngineFactory) -> EngineFor:
    """``engine_for(model)`` of :func:`~flipguard.harden.paired_reinjection` for the campaign
    engine ``factory``: the run's own engine for the run's model, a new one over the same
    inputs, task and format for a hardened copy."""

    def engine_for(m: nn.Module) -> Any:
        base = factory()
        return base if m is factory.parts().run.model else Engine(m, base.inputs, base.task,
                                                                  fmt=factory.fmt)

    return engine_for


def _checked_factory(run: str | Path, store: CampaignStore) -> RunEngineFactory:
    factory = campaign_factory(run, store)
    try:
        check_campaign(store, factory, _FIX)
    except StoreError as exc:
        raise HardeningError(str(exc)) from None
    return factory


def _exposure(factory: RunEngineFactory, res: PairedResult, store: CampaignStore,
              hardware: str, schemes: Sequence[Any]) -> dict[str, Any]:
    parts = factory.parts()
    N = {s.key: int(s.N) for s in store.strata()}
    return paired_exposure(parts.run.model, parts.inputs[:1], hardware, factory.fmt, res, N,
                           schemes)


def _clamps(run: Run, data_dir: str | None, images: int
            ) -> tuple[nn.Module, dict[str, tuple[float, float]]]:
    train = run.load_data(data_dir).train
    train = train[torch.as_tensor(evenly_spaced(len(train), images))]
    bounds = measure_input_bounds(run.model, train, default_clamp_layers(run.model, train))
    return harden_model(run.model, bounds), bounds


def harden_run(run: str | Path, opts: HardenOptions | None = None, *, save: bool = True,
               engine_for: EngineFor | None = None, **options: Any) -> HardeningResult:
    """Plan protections for run directory ``run`` from its campaign, prove them by paired
    re-injection and (``save``) write ``RUN/hardening.json`` (and ``RUN/hardened/`` when the
    schemes include ``act``). ``options`` override fields of ``opts``; ``engine_for``: engine
    builder to reuse across calls (default :func:`campaign_engines`).

    >>> res = harden_run("runs/demo", budget=0.03)  # doctest: +SKIP
    >>> res.overhead <= 0.03                         # doctest: +SKIP
    True
    """
    opts = replace(opts or HardenOptions(), **options)
    wschemes, act = opts.validate()
    with CampaignStore(store_path(run)) as store:
        factory = _checked_factory(run, store)
        r, fmt = factory.parts().run, factory.fmt
        kernel = any(s.kernel is not None for s in store.strata())
        rows = cfr_table(store, by=("layer", "target", "bit") + (("kernel",) if kernel else ()),
                         criterion=opts.criterion)
        total = weight_bits(r.model, fmt)
        hardened, clamps, act_bits = None, None, 0
        if act:
            hardened, bounds = _clamps(r, factory.data_dir, opts.clamp_images)
            act_bits = 2 * 32 * len(bounds)
            clamps = {"layers": {k: list(v) for k, v in bounds.items()}, "cost_bits": act_bits,
                      "path": HARDENED_DIR if save else None}
        if act_bits > float(opts.budget) * total:
            raise HardeningError(f"--budget: activation clamping alone needs {act_bits} bits, "
                                 f"more than {opts.budget:g} of {total} weight bits")
        left = max(0.0, float(opts.budget) - act_bits / total) if act else opts.budget
        plan = plan_hardening(r.model, rows, fmt, left, wschemes or "invariant", opts.policy,
                              opts.method, None if wschemes else [])
        res = paired_reinjection(store, r.model, plan.protections, opts.criterion,
                                 engine_for or campaign_engines(factory), hardened,
                                 opts.n_boot, opts.seed)
        used = [(p.scheme, p.target) for p in plan.protections] + (["act"] if act else [])
        exposure = _exposure(factory, res, store, opts.hardware, used) if opts.hardware \
            else None
    ids = ",".join(map(str, res.fault_ids))
    out = HardeningResult(
        str(r.path), opts, fmt, list(wschemes) + (["act"] if act else []), total, plan, res,
        coverage_summary(r.model, plan.protections, fmt, clamps),
        {"store": store_path(r.path).name, "n_faults": len(res.fault_ids),
         "fault_ids_sha256": hashlib.sha256(ids.encode()).hexdigest()},
        factory.fingerprints(), clamps, act_bits, exposure,
        improvement_curve(r.model, rows, None, fmt, wschemes, opts.policy, opts.method)
        if opts.curve and wschemes else None)
    if save:
        if hardened is not None:
            save_hardened_run(r, hardened, r.path / HARDENED_DIR)
        atomic_write(r.path / RESULT_FILE, json.dumps(out.to_dict(), indent=2) + "\n")
    return out


def evaluate_protections(run: str | Path, protections: Sequence[Protection], criterion: str,
                         engine_for: EngineFor | None = None, hardware: str | None = None,
                         n_boot: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Fixed ``protections`` re-injected on the campaign of run directory ``run`` (e.g. a
    fresh hold-out campaign of the same model): the paired result dict, with ``exposure``
    when ``hardware`` is given. Weight protections only (no activation clamps)."""
    parse_criterion(criterion)
    with CampaignStore(store_path(run)) as store:
        factory = _checked_factory(run, store)
        model = factory.parts().run.model
        res = paired_reinjection(store, model, protections, criterion,
                                 engine_for or campaign_engines(factory), None, n_boot, seed)
        exposure = _exposure(factory, res, store, hardware,
                             [(p.scheme, p.target) for p in protections]) if hardware else None
    return json_clean({**res.to_dict(), "exposure": exposure})


def build_hardened(base: Mapping[str, Any], clamp_layers: Sequence[str]) -> nn.Module:
    """Model factory of a saved hardened run: the base model section's network with clamp
    buffers (filled by ``load_state_dict``) on ``clamp_layers``."""
    return open_clamps(build_model(ModelSection(**dict(base))), clamp_layers)


def save_hardened_run(run: Run, hardened: nn.Module, out: str | Path | None = None,
                      metrics: dict[str, Any] | None = None) -> Path:
    """Write ``hardened`` as a run directory (default ``RUN/hardened``) loadable by
    ``load_run`` and evaluable with ``flipguard evaluate``."""
    base = run.config.model
    if base.kind == "factory" and base.factory in (FACTORY, *LEGACY_FACTORIES):
        raise ConfigError(f"{run.path}: already a hardened run; harden the original run")
    section = ModelSection(kind="factory", factory=FACTORY,
                           params={"base": base.model_dump(),
                                   "clamp_layers": clamped_layers(hardened)})
    config = run.config.model_copy(update={"model": section})
    path = save_run(Path(out) if out is not None else Path(run.path) / HARDENED_DIR, config,
                    hardened, metrics)
    if base.kind == "factory" and base.factory:  # the base run was trusted to be opened here
        sign(path, base.factory, base.params)
    return path

