"""Criticality-aware sampling: a cheap per-site criticality predictor and
criticality-stratified campaigns (unbiased CFR with fewer simulated faults).

See docs/criticality.md.

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
