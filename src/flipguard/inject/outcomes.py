"""Observe: raw facts of one fault (:class:`Outcome`), the golden reference (:class:`Golden`)
and the criteria that classify outcomes after the fact.

Classes (exclusive, in this precedence): ``masked`` (no-op fault or every output bit-identical
to golden), ``non-finite`` (a NaN/Inf in a faulty output or score), ``sdc-critical`` (the
criterion is met), ``sdc-benign`` (some output changed, criterion not met). Every criterion
treats a non-finite output/score as critical: for a detector a non-finite score decides
"anomalous" (as in :func:`flipguard.metrics.threshold_metrics`).

>>> crit = parse_criterion("accuracy-drop:0.01")
>>> g = Golden(kind="detection", n_images=100, accuracy=0.9)
>>> crit.classify(Outcome(n_images=100, n_changed=5, accuracy=0.85), g)
'sdc-critical'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from flipguard.errors import ConfigError
from flipguard.metrics import image_auroc

__all__ = ["Outcome", "Golden", "Criterion", "parse_criterion", "classify", "CLASSES",
           "CRITICAL", "DECISION_FIELDS", "as_arrow", "correct_images", "register_criterion"]

CLASSES = ("masked", "sdc-benign", "sdc-critical", "non-finite")
CRITICAL = ("sdc-critical", "non-finite")
"""The classes that count as critical failures (CFR numerator)."""
DECISION_FIELDS = ("flips_to_anomalous", "flips_to_normal", "mismatches", "accuracy", "f1")
"""Outcome fields fixed by the images' decisions alone (see :meth:`Outcome.same_decisions`)."""


@dataclass
class Outcome:
    """Raw facts of one fault over the evaluated images (flat scalars; None = not applicable).

    ``n_changed``: images whose model output differs bitwise from golden. Detection:
    ``flips_to_anomalous``/``flips_to_normal`` count decision changes (``score > threshold``
    or non-finite => anomalous); ``accuracy``/``f1``/``auroc`` are the faulty metrics;
    ``max_abs_dscore`` is max |faulty - golden score| (inf when a score became non-finite).
    Classification: ``mismatches`` (top-1 changes vs golden) and top-1 ``accuracy``.
    With ``early_stopped`` only ``n_images`` images were run and the metrics count the others
    with their golden results (this keeps the early-stop criterion's verdict).
    ``n_certified``: images not simulated because their decision provably stays golden
    (:mod:`flipguard.inject.certify`); decision metrics stay exact, ``max_abs_dscore`` and
    ``auroc`` then cover the simulated images only. ``certified``: every image certified.

    >>> Outcome.from_dict(Outcome(masked=True).to_dict()).masked
    True
    """

    noop: bool = False
    masked: bool = False
    n_images: int = 0
    n_certified: int = 0
    n_changed: int = 0
    early_stopped: bool = False
    nonfinite_outputs: bool = False
    nonfinite_scores: bool = False
    flips_to_anomalous: int | None = None
    flips_to_normal: int | None = None
    accuracy: float | None = None
    f1: float | None = None
    auroc: float | None = None
    max_abs_dscore: float | None = None
    mismatches: int | None = None

    def same_decisions(self, other: Outcome) -> bool:
        """Whether ``other`` has the same decision facts (:data:`DECISION_FIELDS` and
        non-finite), what decision criteria read: a certified outcome against the
        simulated one.

        >>> Outcome(n_certified=3, accuracy=0.5).same_decisions(Outcome(accuracy=0.5))
        True
        """
        return self.nonfinite == other.nonfinite and all(
            getattr(self, k) == getattr(other, k) for k in DECISION_FIELDS)

    @property
    def certified(self) -> bool:
        """No image was simulated: every decision is proven golden."""
        return self.n_certified > 0 and self.n_images == 0

    @property
    def nonfinite(self) -> bool:
        """Any NaN/Inf in a faulty output or score."""
        return bool(self.nonfinite_outputs or self.nonfinite_scores)

    @property
    def flips(self) -> int:
        """Decision changes (detection) or top-1 mismatches (classification)."""
        if self.mismatches is not None:
            return int(self.mismatches)
        return int(self.flips_to_anomalous or 0) + int(self.flips_to_normal or 0)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of scalars (bool/int/float/None), JSON- and SQLite-friendly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        """Inverse of :meth:`to_dict`; ignores unknown keys, reads SQLite 0/1 as bools."""
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if v is not None:
                kind = str(f.type)
                v = bool(v) if kind == "bool" else int(v) if kind.startswith("int") else float(v)
            out[f.name] = v
        return cls(**out)


@dataclass
class Golden:
    """Golden (fault-free) facts; the per-image arrays are not serialised by :meth:`to_dict`.

    >>> Golden.from_dict(Golden(kind="classification", n_images=4, accuracy=0.5).to_dict()).kind
    'classification'
    """

    kind: str = "detection"
    n_images: int = 0
    accuracy: float | None = None
    f1: float | None = None
    auroc: float | None = None
    threshold: float | None = None
    n_anomalous: int | None = None
    nonfinite: bool = False
    facts: np.ndarray | None = field(default=None, repr=False)  # scores | top-1 predictions
    labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def decisions(self) -> np.ndarray | None:
        """Detection: per-image golden decisions (True = anomalous); else None."""
        if self.kind != "detection" or self.facts is None:
            return None
        return decisions(self.facts, float(self.threshold or 0.0))

    def to_dict(self) -> dict[str, Any]:
        """Scalar fields only (JSON-friendly)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("facts", "labels")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Golden:
        """Inverse of :meth:`to_dict` (arrays stay None)."""
        names = {f.name for f in fields(cls)} - {"facts", "labels"}
        return cls(**{k: v for k, v in d.items() if k in names})


def _num(text: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"criterion: expected a number after ':' in {spec!r}") from None
    if not 0.0 <= v <= 1.0 or math.isnan(v):
        raise ConfigError(f"criterion: expected a value in [0, 1] in {spec!r}")
    return v


class Criterion:
    """When is a fault critical? Built by :func:`parse_criterion`; decides from the raw facts
    of an :class:`Outcome` and the :class:`Golden` facts only.

    >>> parse_criterion("any-flip").is_critical(Outcome(flips_to_normal=1), Golden())
    True
    """

    name = ""
    takes_value = True
    by_decisions = True
    """False: the criterion also depends on scores, so outcomes with certified (not
    simulated) images cannot be judged by it."""

    def __init__(self, delta: float = 0.0) -> None:
        self.delta = float(delta)

    @property
    def text(self) -> str:
        """Canonical text, e.g. ``"accuracy-drop:0.01"``."""
        return f"{self.name}:{self.delta:g}" if self.takes_value else self.name

    def __repr__(self) -> str:
        return f"parse_criterion({self.text!r})"

    def _metric_critical(self, o: Outcome, g: Golden) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_critical(self, outcome: Outcome, golden: Golden) -> bool:
        """True when the criterion is met (always for non-finite outputs/scores)."""
        if outcome.noop or outcome.masked:
            return False
        self._check_certified(outcome)
        return outcome.nonfinite or self._metric_critical(outcome, golden)

    def _check_certified(self, outcome: Outcome) -> None:
        if outcome.n_certified and not self.by_decisions:
            raise ConfigError(f"criterion: {self.text} depends on scores, but some images of "
                              f"certified faults were not simulated (only their decisions are "
                              f"proven); use a decision criterion or run without --certify")

    def classify(self, outcome: Outcome, golden: Golden) -> str:
        """"masked" | "non-finite" | "sdc-critical" | "sdc-benign"."""
        if outcome.noop or outcome.masked:
            return "masked"
        self._check_certified(outcome)
        if outcome.nonfinite:
            return "non-finite"
        return "sdc-critical" if self._metric_critical(outcome, golden) else "sdc-benign"

    def certain(self, outcome: Outcome, golden: Golden, remaining: np.ndarray,
                facts: np.ndarray) -> bool:
        """True when ``outcome`` is critical whatever the not yet evaluated images (bool mask
        ``remaining``; counted golden in ``outcome`` and in the per-image ``facts``) turn out
        to be. Used for early decisions; "not critical" is never certain early, because any
        later image could still become non-finite."""
        if outcome.noop or outcome.masked:
            return False
        if outcome.nonfinite:
            return True
        return self._certain(outcome, golden, remaining, facts)

    def _certain(self, o: Outcome, g: Golden, remaining: np.ndarray, facts: np.ndarray) -> bool:
        return False

    def tolerates(self, golden: Golden, lost: Any, changed: Any) -> np.ndarray:
        """Per entry: True when no outcome with finite outputs that changes at most
        ``changed`` image decisions, ``lost`` of them correct in the golden run, can be
        critical (arrays of one shape). Certifies faults whose every unproven image is
        assumed to flip. The default, for any decision criterion: nothing may change.

        >>> g = Golden(kind="classification", n_images=1000, accuracy=0.9)
        >>> parse_criterion("accuracy-drop:0.002").tolerates(g, [0, 1, 3], [4, 4, 4]).tolist()
        [True, True, False]
        >>> parse_criterion("any-flip").tolerates(g, [0, 0], [0, 1]).tolist()
        [True, False]
        """
        return (np.asarray(changed) == 0) & self.by_decisions

    def _worst_share(self, golden: Golden, k: Any) -> np.ndarray:
        n = max(int(golden.n_images or 0), 1)
        return np.asarray(k, dtype=np.float64) / n


_EPS = 1e-9  # tolerance decisions keep this far from the criterion's edge


class _AccuracyDrop(Criterion):
    name = "accuracy-drop"

    def _metric_critical(self, o: Outcome, g: Golden) -> bool:
        if o.accuracy is None or g.accuracy is None:
            return False
        return g.accuracy - o.accuracy > self.delta

    def _certain(self, o: Outcome, g: Golden, remaining: np.ndarray, facts: np.ndarray) -> bool:
        if g.accuracy is None or g.labels is None or not g.n_images:
            return False
        ok = _correct(g, facts) | remaining  # best case: every remaining image correct
        return g.accuracy - int(ok.sum()) / g.n_images > self.delta

    def tolerates(self, golden: Golden, lost: Any, changed: Any) -> np.ndarray:
        if golden.accuracy is None or not golden.n_images:
            return super().tolerates(golden, lost, changed)
        return self._worst_share(golden, lost) <= self.delta - _EPS


class _AnyFlip(Criterion):
    name, takes_value = "any-flip", False

    def _metric_critical(self, o: Outcome, g: Golden) -> bool:
        return o.flips > 0

    def _certain(self, o: Outcome, g: Golden, remaining: np.ndarray, facts: np.ndarray) -> bool:
        return o.flips > 0


class _AurocDrop(Criterion):
    name = "auroc-drop"
    by_decisions = False

    def _metric_critical(self, o: Outcome, g: Golden) -> bool:
        if o.auroc is None or g.auroc is None:
            return False
        return g.auroc - o.auroc > self.delta

    def _certain(self, o: Outcome, g: Golden, remaining: np.ndarray, facts: np.ndarray) -> bool:
        if g.auroc is None or g.labels is None or g.kind != "detection":
            return False

        best = np.asarray(facts, dtype=np.float64).copy()  # remaining: ideal scores
        pos = g.labels > 0
        best[remaining & pos], best[remaining & ~pos] = np.inf, -np.inf
        return g.auroc - image_auroc(g.labels, best) > self.delta


class _Mismatch(Criterion):
    name = "mismatch"

    def _metric_critical(self, o: Outcome, g: Golden) -> bool:
        if o.mismatches is None or not g.n_images:
            return False
        return o.mismatches / g.n_images > self.delta

    def _certain(self, o: Outcome, g: Golden, remaining: np.ndarray, facts: np.ndarray) -> bool:
        return self._metric_critical(o, g)  # more images can only add mismatches

    def tolerates(self, golden: Golden, lost: Any, changed: Any) -> np.ndarray:
        if not golden.n_images:
            return super().tolerates(golden, lost, changed)
        return self._worst_share(golden, changed) <= self.delta - _EPS


def decisions(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Detector decisions: ``score > threshold`` or non-finite => anomalous (True)."""
    s = np.asarray(scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(s) | (s > threshold)


def correct_images(golden: Golden) -> np.ndarray | None:
    """Per image: correct in the golden run (None without labels or facts)."""
    if golden.labels is None or golden.facts is None:
        return None
    return _correct(golden, np.asarray(golden.facts))


def _correct(g: Golden, facts: np.ndarray) -> np.ndarray:
    assert g.labels is not None
    if g.kind == "detection":
        return decisions(facts, float(g.threshold or 0.0)) == (g.labels > 0)
    if g.kind == "tolerance":  # facts: worst deviation / allowance per image
        return np.asarray(facts, dtype=np.float64) <= 1.0
    return np.asarray(facts) == g.labels


_CRITERIA: dict[str, type[Criterion]] = {
    "accuracy-drop": _AccuracyDrop, "any-flip": _AnyFlip, "auroc-drop": _AurocDrop,
    "mismatch": _Mismatch}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Make a :class:`Criterion` subclass available to :func:`parse_criterion` (and so to
    every ``--criterion`` option) under ``cls.name``; usable as a class decorator. A
    criterion that takes no value sets ``takes_value = False``.

    >>> @register_criterion
    ... class NonFiniteOnly(Criterion):
    ...     name, takes_value = "non-finite-only", False
    ...     def _metric_critical(self, o, g):
    ...         return False
    >>> parse_criterion("non-finite-only").is_critical(Outcome(nonfinite_scores=True), Golden())
    True
    """
    if not (isinstance(cls, type) and issubclass(cls, Criterion)) or not cls.name:
        raise ConfigError("register_criterion: expected a Criterion subclass with a name")
    _CRITERIA[cls.name] = cls
    return cls


def parse_criterion(text: str | Criterion | None = None) -> Criterion:
    """Criterion from text: ``accuracy-drop:δ`` (default ``accuracy-drop:0.01``: accuracy at
    the deployed threshold, or top-1 accuracy, drops by more than δ), ``any-flip`` (any image
    decision changes), ``auroc-drop:δ`` (image AUROC drops by more than δ), ``mismatch:δ``
    (classifier: share of top-1 changes > δ). Non-finite outputs/scores are always critical.

    >>> parse_criterion("auroc-drop:0.02").text
    'auroc-drop:0.02'
    """
    if isinstance(text, Criterion):
        return text
    spec = "accuracy-drop:0.01" if text is None else str(text).strip()
    name, sep, arg = spec.partition(":")
    name = name.strip().lower()
    if name not in _CRITERIA:
        known = ", ".join(f"{k}:δ" if c.takes_value else k for k, c in _CRITERIA.items())
        raise ConfigError(f"criterion: expected one of {known}, got {spec!r}")
    cls = _CRITERIA[name]
    if not cls.takes_value:
        if sep:
            raise ConfigError(f"criterion: {name!r} takes no value, got {spec!r}")
        return cls()
    if not sep:
        raise ConfigError(f"criterion: expected '{name}:<value in [0, 1]>', got {spec!r}")
    return cls(_num(arg.strip(), spec))


def classify(outcome: Outcome, golden: Golden, criterion: str | Criterion | None = None) -> str:
    """Class of ``outcome`` under ``criterion`` (default ``accuracy-drop:0.01``).

    >>> classify(Outcome(noop=True), Golden())
    'masked'
    """
    return parse_criterion(criterion).classify(outcome, golden)


def as_arrow(records: Sequence[dict[str, Any]]) -> Any:
    """``pyarrow.Table`` of flat records (e.g. from ``evaluate_faults``).

    >>> as_arrow([{"layer": "fc", "masked": True}]).num_rows
    1
    """
    import pyarrow as pa

    return pa.Table.from_pylist(list(records))
