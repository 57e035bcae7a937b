"""Criticality-stratified sampling: sub-strata by predicted class, allocation, CFR estimator.

Within a planned stratum (layer, bit, kernel, ...) the faults are split by predicted class
``h`` into sub-strata of exactly known sizes ``N_h``. Every sub-stratum is sampled (an audit
of at least ``audit`` faults, all of them when smaller), uniformly without replacement with
its own seeded generator, so a wrong predictor costs precision, never correctness.

Rounds: 0 audits every sub-stratum; 1 draws the allocation planned from the audit; a
sequential design (``run_stratified(sequential=True)``, ``campaign run --refine``) then tops
up and always ends with a closing round (:func:`flipguard.campaign.topup.plan_round`).

Estimator (:mod:`flipguard.campaign.sequential`): per sub-stratum the audited faults count
as themselves and every later round's Horvitz–Thompson estimate of the faults not drawn
before it is combined with weights fixed before the round is drawn, which is exactly unbiased
across adaptive rounds; ``p = sum W_h p_h``, ``W_h = N_h / N``. With one round after the audit
this is ``p_h = (k0 + (N_h - n0) k / n) / N_h`` (:class:`Cell`, :func:`estimate`). Interval:
MOVER (Zou & Donner 2008; Newcombe's method for linear combinations of proportions) on
per-round Clopper–Pearson (or Wilson) intervals ``[l, u]`` with the finite-population
correction through ``n_eff = n (R - 1) / (R - n)``::

    lo = p - sqrt(sum c^2 (q - l)^2),   hi = p + sqrt(sum c^2 (u - q)^2)

A round with ``k = 0`` keeps a positive upper distance, so the unseen critical faults of a
"predicted harmless" class always widen the interval. ``margin = max(hi - p, p - lo)``.

Allocation: pilot-calibrated ``p~_h = (k_h + 2 π_h) / (n_h + 2)`` (``π_h`` the class prior),
then the next samples go greedily to the sub-stratum whose extra samples shrink the predicted
margin most per fault (for normal intervals this converges to Neyman allocation
``n_h ∝ N_h sqrt(p_h (1 - p_h))``, see :func:`neyman`) until it reaches the target.

>>> est = estimate([(900, 30, 0), (100, 40, 10)], 0.95)
>>> round(est.p, 3), est.ci[0] == 0.0 or est.ci[0] > 0
(0.025, True)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from flipguard.campaign.sequential import History, sequential_estimate
from flipguard.campaign.stats import METHODS, interval, mover, wilson
from flipguard.campaign.topup import plan_round
from flipguard.errors import ConfigError

CLASS_LABELS = ("harmless", "low", "borderline", "critical", "extreme")
"""Predicted criticality classes of stratified sampling, least to most critical."""
CLASS_PRIORS = (0.002, 0.02, 0.2, 0.6, 0.95)
"""Prior critical rate of each class (used to plan the audit and before data)."""
CERTIFIED = len(CLASS_LABELS)
"""Class of the faults a certifier proves to change no decision
(:meth:`flipguard.inject.certify.Certifier.certified_sites`): their sub-stratum is known
exactly (rate 0, never simulated), so only the uncertified remainder is sampled."""


def class_label(labels: Sequence[str], h: int) -> str:
    """Label of class ``h`` (``"certified"`` for :data:`CERTIFIED`).

    >>> class_label(CLASS_LABELS, CERTIFIED), class_label(CLASS_LABELS, 0)
    ('certified', 'harmless')
    """
    return "certified" if int(h) == CERTIFIED else labels[int(h)]


def class_prior(h: int, priors: Sequence[float] | None = None) -> float:
    """Prior critical rate of class ``h``: ``priors[h]`` (a plan's calibrated priors) or
    :data:`CLASS_PRIORS`; 0 for :data:`CERTIFIED` (known, not a prior).

    >>> class_prior(0), class_prior(0, (0.0007, 0.0006, 0.01, 0.3, 0.99)), class_prior(CERTIFIED)
    (0.002, 0.0007, 0.0)
    """
    return 0.0 if int(h) == CERTIFIED else (CLASS_PRIORS if priors is None else priors)[int(h)]


def check_class_priors(values: Sequence[float]) -> tuple[float, ...]:
    """One prior critical rate in (0, 1) per class of :data:`CLASS_LABELS`, least to most
    critical (``class-priors`` of a plan).

    >>> check_class_priors([0.001, 0.002, 0.01, 0.3, 0.99])
    (0.001, 0.002, 0.01, 0.3, 0.99)
    """
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != len(CLASS_LABELS) or not all(0.0 < v < 1.0 for v in out):
        raise ConfigError(f"class-priors: expected {len(CLASS_LABELS)} rates in (0, 1), one "
                          f"per class ({', '.join(CLASS_LABELS)}), got {values!r}")
    return out


__all__ = ["CERTIFIED", "CLASS_LABELS", "CLASS_PRIORS", "Cell", "StratEstimate",
           "StratifiedResult", "allocate", "cell_interval", "check_class_priors", "class_label",
           "class_prior", "draw",
           "estimate", "neyman", "plan_rates", "predicted_margin", "run_stratified", "split_key",
           "sub_interval", "substratum_key", "substratum_rng"]


def substratum_key(parent: str, cls: int) -> str:
    """Key of the sub-stratum of predicted class ``cls`` of stratum ``parent``.

    >>> substratum_key("weight:encoder.0", 4)
    'weight:encoder.0:crit=4'
    """
    return f"{parent}:crit={int(cls)}"


def split_key(key: str) -> tuple[str, int | None]:
    """Inverse of :func:`substratum_key`; ``(key, None)`` for an ordinary stratum key."""
    head, sep, tail = key.rpartition(":crit=")
    return (head, int(tail)) if sep and tail.isdigit() else (key, None)


def substratum_rng(seed: int, key: str, round_: int = 0) -> np.random.Generator:
    """``default_rng(SeedSequence([seed, round, *sha256(key) words]))`` (as the planner)."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(round_),
                                                         *map(int, words)]))


def draw(classes: np.ndarray, cls: int, n: int, seed: int, key: str, round_: int = 0,
         exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct faults of class ``cls`` drawn uniformly without replacement, skipping
    the sub-stratum-local numbers ``exclude``: ``(k, j)`` sorted by ``k``, where ``k`` is
    the number within the class (in stratum order) and ``j`` the stratum-local fault."""
    members = np.flatnonzero(np.asarray(classes) == cls)
    excl = np.unique(np.fromiter(exclude, dtype=np.int64))
    left = len(members) - len(excl)
    if not 0 <= n <= left:
        raise ConfigError(f"n: expected 0..{left} faults left in sub-stratum {key!r}, got {n}")
    r = substratum_rng(seed, key, round_).choice(left, size=n, replace=False).astype(np.int64)
    if len(excl):  # r-th number not excluded
        r = r + np.searchsorted(excl - np.arange(len(excl)), r, side="right")
    k = np.sort(r)
    return k, members[k]


def sub_interval(N: int, n: float, k: float, confidence: float,
                 method: str = "clopper-pearson") -> tuple[float, float]:
    """Interval of the rate of a population of ``N`` from ``k`` of ``n`` drawn without
    replacement (:func:`flipguard.campaign.stats.interval` with the effective-size FPC, as
    the sequential estimator's vectorised parts, widened to contain ``k / n``)."""
    if n <= 0:
        if method not in METHODS:
            raise ConfigError(f"method: expected wilson or clopper-pearson, got {method!r}")
        return (0.0, 1.0)
    lo, hi = interval(k, n, confidence, method, N=N, exact_fpc=False)
    return (min(lo, k / n), max(hi, k / n))


class Cell(NamedTuple):
    """A sub-stratum of ``N`` faults: ``n0`` audited first (``k0`` critical, counted exactly
    as themselves) and ``n`` drawn afterwards from the other ``N - n0`` (``k`` critical),
    which estimate the rate of those. ``fill``: point value of an unsampled remainder."""

    N: int
    n: float
    k: float
    n0: int = 0
    k0: float = 0
    fill: float = 0.5


@dataclass(frozen=True)
class StratEstimate:
    """Stratified CFR: point ``p``, MOVER interval ``ci``, ``margin``, sizes and (sequential
    estimator) the variance estimate ``var``."""

    p: float
    ci: tuple[float, float]
    margin: float
    n: int
    k: int
    N: int
    var: float = math.nan


def cell_interval(c: Cell, confidence: float, method: str = "clopper-pearson"
                  ) -> tuple[float, float, float]:
    """``(p, lo, hi)`` of one cell: ``p = (k0 + (N - n0) k / n) / N``."""
    rest = c.N - c.n0
    if rest <= 0:
        p = c.k0 / c.N
        return p, p, p
    if c.n <= 0:
        return (c.k0 + rest * c.fill) / c.N, c.k0 / c.N, (c.k0 + rest) / c.N
    lo, hi = sub_interval(rest, c.n, c.k, confidence, method)
    return tuple((c.k0 + rest * v) / c.N for v in (c.k / c.n, lo, hi))  # type: ignore


def estimate(cells: Sequence[Cell | tuple], confidence: float,
             method: str = "clopper-pearson") -> StratEstimate:
    """Combine sub-strata (:class:`Cell` s or ``(N, n, k)`` tuples) with the MOVER interval
    (see module docstring)."""
    cells = [c if isinstance(c, Cell) else Cell(*c) for c in cells]
    cells = [c for c in cells if c.N > 0]
    N = sum(int(c.N) for c in cells)
    if N <= 0:
        return StratEstimate(math.nan, (0.0, 1.0), math.nan, 0, 0, 0)
    parts = [(c.N / N, *cell_interval(c, confidence, method)) for c in cells]
    p = sum(w * ph for w, ph, _, _ in parts)
    lo, hi = mover(parts)
    n_all = int(sum(c.n + c.n0 for c in cells))
    k_all = sum(c.k + c.k0 for c in cells)
    return StratEstimate(p, (lo, hi), max(hi - p, p - lo), n_all, int(round(k_all)), N)


def predicted_margin(N: Sequence[int], n: Sequence[int], p: Sequence[float],
                     confidence: float, method: str = "clopper-pearson",
                     n0: Sequence[int] | None = None) -> float:
    """Margin :func:`estimate` would report with the expected ``k = p n`` criticals
    (``n0`` audited faults per sub-stratum, ``n`` drawn after them)."""
    n0 = [0] * len(N) if n0 is None else n0
    cells = [Cell(int(a), b, c * b, int(d), c * d)
             for a, b, c, d in zip(N, n, p, n0, strict=True)]
    return estimate(cells, confidence, method).margin if sum(N) else 0.0


def plan_rates(n: Sequence[int], k: Sequence[int], priors: Sequence[float],
               level: float = 0.0, strength: float = 2.0) -> np.ndarray:
    """Rates to plan with: the pilot-calibrated ``(k + strength π) / (n + strength)`` (``π``
    the class prior; ``π`` itself where nothing was observed). ``level > 0``: cautiously the
    value closest to 1/2 in the ``level`` Wilson interval of those pseudo-counts instead.

    >>> plan_rates([0, 30, 30], [0, 0, 30], [0.1, 0.002, 0.95]).round(4).tolist()
    [0.1, 0.0001, 0.9969]
    """
    out = np.asarray(priors, dtype=np.float64)[: len(n)].copy()
    for h, (nh, kh) in enumerate(zip(n, k, strict=True)):
        if nh > 0:
            kk, nn = kh + strength * out[h], nh + strength
            lo, hi = wilson(kk, nn, level) if level > 0 else (kk / nn, kk / nn)
            out[h] = min(max(0.5, lo), hi)
    return out


def neyman(n: int, N: Sequence[int], p: Sequence[float], minimum: int = 0) -> np.ndarray:
    """Neyman allocation ``n_h ∝ N_h sqrt(p_h (1 - p_h))`` of ``n`` faults, each sub-stratum
    within ``[min(minimum, N_h), N_h]`` (largest-remainder rounding, ties: first wins).

    >>> neyman(100, [1000, 1000, 1000], [0.5, 0.0, 0.5], minimum=10).tolist()
    [45, 10, 45]
    """
    N_ = np.asarray(N, dtype=np.int64)
    pp = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    lower = np.minimum(N_, int(minimum))
    n = int(min(max(int(n), int(lower.sum())), int(N_.sum())))
    alloc, fixed = np.zeros(len(N_), np.int64), np.zeros(len(N_), dtype=bool)
    while True:
        free = ~fixed
        left = n - int(alloc[fixed].sum())
        w = np.where(free, N_ * np.sqrt(pp * (1 - pp)), 0.0)
        if w.sum() <= 0:
            w = np.where(free, N_.astype(np.float64), 0.0)
        quota = left * w / w.sum() if w.sum() > 0 else np.zeros(len(N_))
        low, high = free & (quota < lower), free & (quota > N_)
        if not (low | high).any():
            break
        alloc[low], alloc[high] = lower[low], N_[high]
        fixed |= low | high
    fl = np.floor(quota).astype(np.int64)
    order = [i for i in np.argsort(-(quota - fl), kind="stable") if free[i]]
    for i in order[: left - int(fl[free].sum())]:
        fl[i] += 1
    alloc[free] = fl[free]
    return alloc


def allocate(N: Sequence[int], p: Sequence[float], error: float, confidence: float,
             audit: int = 30, have: Sequence[int] | None = None,
             n0: Sequence[int] | None = None, method: str = "clopper-pearson",
             budget: int | None = None) -> np.ndarray:
    """Faults to draw per sub-stratum after the ``n0`` audited ones (at least ``have`` and
    ``min(audit, N - n0)``) until the predicted margin at rates ``p`` is at most ``error``:
    each step adds ~10 % to the sub-stratum with the largest margin reduction per fault
    (``budget`` caps the total drawn after the audit)."""
    N_ = np.asarray(N, dtype=np.int64)
    base = np.zeros(len(N_), np.int64) if n0 is None else np.asarray(n0, dtype=np.int64)
    room = N_ - base
    n = np.minimum(room, int(audit))
    if have is not None:
        n = np.maximum(n, np.asarray(have, dtype=np.int64))
    margin = lambda m: predicted_margin(N_, m, p, confidence, method, base)  # noqa: E731
    cur = margin(n)
    while cur > error and (budget is None or n.sum() < budget):
        best, best_gain, best_n = -1, -math.inf, n
        for h in np.flatnonzero(n < room):
            trial = n.copy()
            trial[h] += int(min(room[h] - n[h], max(1, math.ceil(0.1 * n[h]))))
            gain = (cur - margin(trial)) / (trial[h] - n[h])
            if gain > best_gain:
                best, best_gain, best_n = h, gain, trial
        if best < 0:
            break
        n, cur = best_n, margin(best_n)
    return n


@dataclass
class StratifiedResult:
    """Outcome of :func:`run_stratified` for one stratum: per class ``N``, the audited
    ``n0``/``k0`` and the later ``n``/``k`` (all rounds after the audit);
    ``history[h]`` = ``(round, n, k)`` of class ``h``'s rounds after the audit; ``drawn[h]``
    = stratum-local faults run."""

    key: str
    estimate: StratEstimate
    N: list[int]
    n0: list[int]
    k0: list[int]
    n: list[int]
    k: list[int]
    rounds: int
    drawn: dict[int, np.ndarray] = field(default_factory=dict)
    history: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    priors: list[float] = field(default_factory=lambda: list(CLASS_PRIORS))

    @property
    def total(self) -> int:
        return int(sum(self.n0) + sum(self.n))

    def histories(self) -> list[History]:
        """Per class with faults: its :class:`~flipguard.campaign.sequential.History`."""
        pri = np.resize(np.asarray(self.priors, dtype=np.float64), len(self.N))
        out = []
        for h, (a, b, c) in enumerate(zip(self.N, self.n0, self.k0, strict=True)):
            if a:
                rnd, n, k = (tuple(v) for v in zip(*self.history.get(h, []), strict=True)
                             ) if self.history.get(h) else ((), (), ())
                out.append(History(a, b, c, rnd, n, k, prior=float(pri[h])))
        return out

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        rows = zip(self.N, self.n0, self.k0, self.n, self.k, strict=True)
        return {"key": self.key, "cfr": e.p, "ci": list(e.ci), "margin": e.margin,
                "n": self.total, "critical": e.k, "N": e.N, "rounds": self.rounds,
                "sub": [{"class": h, "N": a, "audit": b, "audit_critical": c, "n": d,
                         "critical": f, "history": [list(t) for t in self.history.get(h, [])]}
                        for h, (a, b, c, d, f) in enumerate(rows) if a]}


def run_stratified(classes: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray], *,
                   error: float, confidence: float, seed: int = 0, key: str = "",
                   audit: int = 30, method: str = "clopper-pearson",
                   priors: Sequence[float] = CLASS_PRIORS, sequential: bool = False,
                   max_rounds: int = 8, undershoot: float = 1.0) -> StratifiedResult:
    """Criticality-stratified estimate of one stratum's CFR.

    ``classes[j]``: predicted class of stratum-local fault ``j``; ``evaluate(j_array)`` runs
    those faults and returns whether each is critical. Round 0 audits every class; round 1
    draws the allocation planned from the audit (:func:`plan_rates`, :func:`allocate`)
    among the other faults (the two-phase design, the last round unless ``sequential``).
    ``sequential``: top-ups planned from all rounds so far, ending with a closing round
    (:func:`~flipguard.campaign.topup.plan_round`, at most ``max_rounds``); the
    estimate is unbiased across the rounds (:mod:`flipguard.campaign.sequential`).

    >>> cls = np.repeat([0, 3], [900, 100]); truth = np.arange(1000) % 50 == 0
    >>> res = run_stratified(cls, lambda j: truth[j], error=0.02, confidence=0.9,
    ...                      sequential=True)
    >>> res.rounds >= 2, bool(res.estimate.ci[0] <= truth.mean() <= res.estimate.ci[1])
    (True, True)
    """
    classes = np.asarray(classes).astype(np.int64)
    H = max(len(priors), int(classes.max()) + 1 if classes.size else 0)
    N = np.bincount(classes, minlength=H)
    pri = np.resize(np.asarray(priors, dtype=np.float64), H)
    n0, k0 = np.zeros(H, np.int64), np.zeros(H, np.int64)
    hist: dict[int, list[tuple[int, int, int]]] = {h: [] for h in range(H)}
    drawn: dict[int, list[np.ndarray]] = {h: [] for h in range(H)}

    def run(h: int, m: int, rnd: int) -> None:
        kk, jj = draw(classes, h, m, seed, substratum_key(key, h), rnd,
                      exclude=np.concatenate(drawn[h]) if drawn[h] else ())
        drawn[h].append(kk)
        crit = int(np.asarray(evaluate(jj), dtype=bool).sum())
        if rnd == 0:
            n0[h], k0[h] = len(jj), crit
        else:
            hist[h].append((rnd, len(jj), crit))

    def counts() -> tuple[np.ndarray, np.ndarray]:
        return (np.array([sum(t[1] for t in hist[h]) for h in range(H)], np.int64),
                np.array([sum(t[2] for t in hist[h]) for h in range(H)], np.int64))

    def result() -> StratifiedResult:
        e = StratEstimate(math.nan, (0.0, 1.0), math.nan, 0, 0, 0)
        return StratifiedResult(key, e, N.tolist(), n0.tolist(), k0.tolist(),
                                *(v.tolist() for v in counts()), rounds, {},
                                {h: list(v) for h, v in hist.items() if v}, pri.tolist())

    for h in np.flatnonzero(N):
        run(h, int(min(N[h], audit)), 0)
    rounds = 0
    if (n0 < N).any():
        target = allocate(N, plan_rates(n0, k0, pri), undershoot * error, confidence, audit,
                          None, n0, method)
        for h in np.flatnonzero(target):
            run(h, int(target[h]), 1)
        rounds = 1
    live = np.flatnonzero(N)  # the classes of result().histories(), in order
    for rnd in range(2, max_rounds + 1 if sequential else 2):
        n, k = counts()
        if (n0 + n >= N).all():
            break
        x, closing = plan_round(result().histories(), plan_rates(n0 + n, k0 + k, pri)[live],
                                undershoot * error, confidence, method, last=rnd == max_rounds)
        for h, m in zip(live.tolist(), x.tolist(), strict=True):
            if m > 0:
                run(h, m, rnd)
        rounds = rnd
        if closing:
            break
    out = result()
    e = sequential_estimate(out.histories(), confidence, method)
    out.estimate = StratEstimate(e.p, e.ci, e.margin, e.n, e.k, e.N, e.var)
    members = {h: np.flatnonzero(classes == h) for h in range(H) if drawn[h]}
    out.drawn = {h: members[h][np.concatenate(drawn[h])] for h in members}
    return out
