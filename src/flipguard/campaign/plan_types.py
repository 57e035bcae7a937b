"""Plan types: how a campaign's faults are planned, topped up and estimated. The caller
picks one by name (``PlanConfig.sampling``); planner, runner and analysis stay generic.

* ``uniform``: Leveugle sample sizes per stratum, uniform draws, optional iterative top-ups
  with the observed rate; stratified estimator of :func:`flipguard.campaign.stats.stratified`.
* ``stratified``: every stratum split by a criticality predictor into sub-strata, audited,
  allocated and topped up in declared rounds; estimator unbiased across the rounds
  (:mod:`flipguard.campaign.stratified`).

>>> sampling_type("uniform").name, sorted(SAMPLING_TYPES)
('uniform', ['stratified', 'uniform'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from flipguard.campaign.planner import Plan, PlanConfig, PlannedStratum, make_plan
from flipguard.campaign.refine import refine_uniform
from flipguard.campaign.stats import Estimate, stratified
from flipguard.campaign.stratified import refine_stratified, stratify_plan, substrata_estimate
from flipguard.campaign.substrata import CERTIFIED
from flipguard.errors import ConfigError

__all__ = ["SAMPLING_TYPES", "STRATIFIED", "UNIFORM", "Sampling", "sampling_type"]

Cells = Sequence[tuple[PlannedStratum, int]]


class Sampling(Protocol):
    """A plan type."""

    name: str
    needs_predictor: bool

    def make(self, model: Any, config: PlanConfig, predictor: Any = None) -> Plan: ...

    def refine(self, store: Any, model: Any, criterion: str, predictor: Any = None,
               max_rounds: int = 3) -> int: ...

    def estimate(self, cells: Cells, per: dict, first: dict, rounds: dict,
                 classes: Sequence[str], confidence: float, method: str) -> Estimate: ...


class UniformSampling:
    """Leveugle strata drawn uniformly (see module docstring)."""

    name, needs_predictor = "uniform", False

    def make(self, model: Any, config: PlanConfig, predictor: Any = None) -> Plan:
        return make_plan(model, config)

    def refine(self, store: Any, model: Any, criterion: str, predictor: Any = None,
               max_rounds: int = 3) -> int:
        return refine_uniform(store, model, criterion, max_rounds)

    def estimate(self, cells: Cells, per: dict, first: dict, rounds: dict,
                 classes: Sequence[str], confidence: float, method: str) -> Estimate:
        return stratified([(N, sum(per[s.key].values()), sum(per[s.key][c] for c in classes))
                           for s, N in cells], confidence, method)


class StratifiedSampling:
    """Criticality sub-strata (see module docstring); needs the predictor."""

    name, needs_predictor = "stratified", True

    def _need(self, predictor: Any) -> Any:
        if predictor is None:
            raise ConfigError("sampling: 'stratified' needs a criticality predictor (the "
                              "run's; see docs/criticality.md)")
        return predictor

    def make(self, model: Any, config: PlanConfig, predictor: Any = None) -> Plan:
        return stratify_plan(make_plan(model, config), self._need(predictor))

    def refine(self, store: Any, model: Any, criterion: str, predictor: Any = None,
               max_rounds: int = 3) -> int:
        return refine_stratified(store, model, self._need(predictor), criterion, max_rounds)

    def estimate(self, cells: Cells, per: dict, first: dict, rounds: dict,
                 classes: Sequence[str], confidence: float, method: str) -> Estimate:
        e = substrata_estimate(cells, per, first, classes, confidence, rounds)
        total = sum(N for _, N in cells)
        unc = sum(N for s, N in cells if getattr(s, "crit", None) != CERTIFIED
                  and not sum(per[s.key].values())) / total if total else 0.0
        return Estimate(e.p, e.var, e.margin, e.ci, e.n, e.k, e.N, e.n_eff, unc)


UNIFORM, STRATIFIED = UniformSampling(), StratifiedSampling()
SAMPLING_TYPES: dict[str, Sampling] = {"uniform": UNIFORM, "stratified": STRATIFIED}


def sampling_type(name: str) -> Sampling:
    """The plan type called ``name``."""
    try:
        return SAMPLING_TYPES[name]
    except KeyError:
        raise ConfigError(f"sampling: expected one of {', '.join(SAMPLING_TYPES)}, "
                          f"got {name!r}") from None
