"""Certified sub-strata: a criticality predictor whose faults a certifier proves harmless
form their own sub-stratum, known exactly (rate 0) and never simulated, so a stratified plan
samples only each stratum's uncertified remainder (``PlanConfig(exclude_certified=True)``).

The estimate stays valid for the whole population: a stratum's CFR is
``sum_h W_h p_h`` over its sub-strata, the certified one contributing ``W_c * 0`` with no
variance (its census is the certificate), the others estimated from their samples.

>>> import numpy as np
>>> class Base:
...     def classes(self, layer, bit=None, kernel=None, bits=None, target=None, kinds=("flip",)):
...         return np.zeros(4, np.uint8)
>>> class Cert:
...     def certified_sites(self, layer, target, index, bit, kind, criterion=None):
...         return np.asarray(bit) < 8
>>> p = CertifiedPredictor(Base(), Cert())
>>> p.certified("fc", "weight", np.arange(3), np.array([0, 9, 30]), "flip").tolist()
[True, False, False]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flipguard.campaign.substrata import CLASS_LABELS
from flipguard.errors import ConfigError
from flipguard.inject.outcomes import parse_criterion

__all__ = ["CertifiedPredictor", "certified_for", "check_judged"]


def certified_for(plan_criterion: str) -> str | None:
    """What a plan's certified faults are proven for: None (no decision changes, so every
    decision criterion) when planned with ``any-flip``, else that criterion's text."""
    crit = parse_criterion(plan_criterion)
    return None if crit.name == "any-flip" else crit.text


def check_judged(plan_criterion: str, criterion: str) -> None:
    """Refuse to judge a plan with certified sub-strata by a criterion its certificates do
    not cover (they are counted, never simulated).

    >>> check_judged("any-flip", "accuracy-drop:0.05")
    >>> try:
    ...     check_judged("accuracy-drop:0.01", "any-flip")
    ... except ConfigError as exc:
    ...     print(str(exc).split("; ")[-1])
    use --criterion accuracy-drop:0.01
    """
    crit, proven = parse_criterion(criterion), certified_for(plan_criterion)
    if proven is None and crit.by_decisions or crit.text == proven:
        return
    what = "their decisions" if proven is None else f"non-critical only under {proven}"
    hint = "a decision criterion" if proven is None else f"--criterion {proven}"
    raise ConfigError(f"criterion: this plan's certified faults are proven {what} (they were "
                      f"never simulated), not under {crit.text}; use {hint}")


@dataclass
class CertifiedPredictor:
    """``predictor``'s classes, plus ``certified`` from a certifier with
    ``certified_sites(layer, target, index, bit, kind, criterion)`` (e.g.
    :class:`flipguard.inject.certify.Certifier`). ``criterion`` None: a certified fault
    changes no decision (any decision criterion may judge the campaign); a criterion: it
    provably is not critical under that criterion (only it may)."""

    predictor: Any
    certifier: Any
    criterion: Any = None

    @property
    def labels(self) -> Sequence[str]:
        return getattr(self.predictor, "labels", CLASS_LABELS)

    def classes(self, layer: str, bit: int | None = None, kernel: int | None = None,
                bits: Any = None, target: str | None = None,
                kinds: Sequence[str] = ("flip",)) -> np.ndarray:
        """The predictor's classes (the plan moves certified faults afterwards)."""
        return self.predictor.classes(layer, bit, kernel, bits, target, kinds)

    def class_of(self, faults: Sequence[Any]) -> np.ndarray:
        return self.predictor.class_of(faults)

    def certified(self, layer: str, target: str, index: np.ndarray, bit: np.ndarray,
                  kind: str = "flip") -> np.ndarray:
        """Per fault: True when it provably is not critical (see the class)."""
        return np.asarray(self.certifier.certified_sites(layer, target, index, bit, kind,
                                                         self.criterion), bool)
