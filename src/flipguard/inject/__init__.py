"""Fault injection: in-place inject/restore, the fast exact engine, outcomes and criteria.

>>> from flipguard.inject import Engine, DetectionTask, parse_criterion
>>> parse_criterion("any-flip").text
'any-flip'
"""

from flipguard.inject.engine import Engine, evaluate_faults
from flipguard.inject.injector import activation_fault, faulty_value, inject
from flipguard.inject.outcomes import (
    CLASSES,
    Criterion,
    Golden,
    Outcome,
    as_arrow,
    classify,
    parse_criterion,
)
from flipguard.inject.tasks import ClassificationTask, DetectionTask, Task

__all__ = [
    "CLASSES", "ClassificationTask", "Criterion", "DetectionTask", "Engine", "Golden",
    "Outcome", "Task", "activation_fault", "as_arrow", "classify", "evaluate_faults",
    "faulty_value", "inject", "parse_criterion",
]
