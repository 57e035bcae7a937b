"""A cheap per-fault criticality predictor (first-order score sensitivity per site), whose
classes drive criticality-stratified campaigns (the ``stratified`` plan type of
:mod:`flipguard.campaign.plan_types`). See docs/criticality.md.

>>> from flipguard.criticality import classes_of_rho
>>> classes_of_rho([0.0, 5.0]).tolist()
[0, 3]
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

__all__ = ["CLASS_LABELS", "CLASS_PRIORS", "DEFAULT_EDGES", "EXTREME", "Predictor",
           "classes_of_rho", "criterion_k", "differentiable_score_fn"]
