"""Fault injection: in-place inject/restore, the fast exact engine, outcomes and criteria.

>>> from flipguard.inject import Engine, DetectionTask, parse_criterion
>>> parse_criterion("any-flip").text
'any-flip'
"""

from flipguard.inject.engine import Engine, evaluate_faults
from flipguard.inject.injector import activation_fault, faulty_value, inject
from flipguard.inject.outcomes import (
    CLASSES,
    CRITICAL,
    Criterion,
    Golden,
    Outcome,
    as_arrow,
    classify,
    parse_criterion,
    register_criterion,
)
from flipguard.inject.tasks import ClassificationTask, DetectionTask, Task, ToleranceTask

__all__ = [
    "CLASSES", "CRITICAL", "ClassificationTask", "Criterion", "DetectionTask", "Engine",
    "Golden", "Outcome", "Task", "ToleranceTask", "activation_fault", "as_arrow", "classify",
    "evaluate_faults", "faulty_value", "inject", "parse_criterion", "register_criterion",
]
