"""Criticality-aware sampling: a cheap per-site criticality predictor and
criticality-stratified campaigns (unbiased CFR with fewer simulated faults).

See docs/criticality.md.

>>> from flipguard.criticality import classes_of_rho, estimate
>>> classes_of_rho([0.0, 5.0]).tolist(), round(estimate([(100, 100, 7)], 0.99).p, 2)
([0, 3], 0.07)
"""

from flipguard.criticality.predictor import (
    CLASS_LABELS,
    CLASS_PRIORS,
    DEFAULT_EDGES,
    EXTREME,
    Predictor,
    classes_of_rho,
    criterion_k,
    differentiable_score_fn,
)
from flipguard.criticality.stratified import (
    Cell,
    StratEstimate,
    StratifiedResult,
    allocate,
    draw,
    estimate,
    neyman,
    plan_rates,
    run_stratified,
)

__all__ = ["CLASS_LABELS", "CLASS_PRIORS", "DEFAULT_EDGES", "EXTREME", "Predictor",
           "classes_of_rho", "criterion_k", "differentiable_score_fn",
           "Cell", "StratEstimate", "StratifiedResult", "allocate", "draw", "estimate", "neyman",
           "plan_rates", "run_stratified", "calibration_table", "predictor_for_run"]


def __getattr__(name: str):  # campaign glue, imported on first use
    if name in ("calibration_table", "predictor_for_run"):
        from flipguard.criticality import campaign

        return getattr(campaign, name)
    raise AttributeError(f"module 'flipguard.criticality' has no attribute {name!r}")
