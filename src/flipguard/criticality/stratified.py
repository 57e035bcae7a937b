"""Criticality-stratified sampling: sub-strata by predicted class, allocation, CFR estimator.

Within a planned stratum (layer, bit, kernel, ...) the faults are split by predicted class
``h`` into sub-strata of exactly known sizes ``N_h``. Every sub-stratum is sampled (an audit
of at least ``audit`` faults, all of them when smaller), uniformly without replacement with
its own seeded generator, so a wrong predictor costs precision, never correctness.

Estimator: ``p = sum W_h p_h`` with ``W_h = N_h / N`` and ``p_h = k_h / n_h`` (unbiased for
fixed ``n_h``). Interval: MOVER (Zou & Donner 2008; Newcombe's method for linear combinations
of proportions) on per-sub-stratum Wilson (or Clopper–Pearson) intervals ``[l_h, u_h]`` with
the finite-population correction through ``n_eff = n (N - 1) / (N - n)``::

    lo = p - sqrt(sum W_h^2 (p_h - l_h)^2),   hi = p + sqrt(sum W_h^2 (u_h - p_h)^2)

A sub-stratum with ``k_h = 0`` keeps a positive upper distance ``≈ z^2 / (n_h + z^2)``, so
the unseen critical faults of a "predicted harmless" class always widen the interval.
``margin = max(hi - p, p - lo)``.

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
from typing import Any

import numpy as np

from flipguard.campaign.stats import clopper_pearson, t_value, wilson
from flipguard.criticality.predictor import CLASS_PRIORS
from flipguard.errors import ConfigError

__all__ = ["StratEstimate", "StratifiedResult", "allocate", "calibrate", "draw", "estimate",
           "neyman", "predicted_margin", "run_stratified", "split_key", "sub_interval",
           "substratum_key", "substratum_rng"]

Cell = tuple  # (N, n, k) or (N, n, k, fill): fill = point value used when n == 0


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
                 method: str = "wilson") -> tuple[float, float]:
    """Interval of one sub-stratum's rate (FPC via the effective size; exact when n >= N)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    if n >= N:
        return (p, p)
    n_eff = n * (N - 1) / (N - n) if N > 1 else n
    fn = wilson if method == "wilson" else clopper_pearson
    if method not in ("wilson", "clopper-pearson"):
        raise ConfigError(f"method: expected wilson or clopper-pearson, got {method!r}")
    lo, hi = fn(p * n_eff, n_eff, confidence)
    return (min(lo, p), max(hi, p))


@dataclass(frozen=True)
class StratEstimate:
    """Stratified CFR: point ``p``, MOVER interval ``ci``, ``margin``, sizes."""

    p: float
    ci: tuple[float, float]
    margin: float
    n: int
    k: int
    N: int


def estimate(cells: Sequence[Cell], confidence: float,
             method: str = "wilson") -> StratEstimate:
    """Combine sub-strata ``(N_h, n_h, k_h[, fill])`` (see module docstring). A cell with
    ``n_h = 0`` counts as ``fill`` (default 0.5) with the interval [0, 1]."""
    N = sum(int(c[0]) for c in cells if c[0] > 0)
    if N <= 0:
        return StratEstimate(math.nan, (0.0, 1.0), math.nan, 0, 0, 0)
    p = lo2 = hi2 = 0.0
    n_all, k_all = 0, 0.0
    for c in cells:
        Nh, nh, kh = int(c[0]), int(c[1]), float(c[2])
        if Nh <= 0:
            continue
        w = Nh / N
        ph = kh / nh if nh > 0 else float(c[3] if len(c) > 3 else 0.5)
        lh, uh = sub_interval(Nh, nh, kh, confidence, method)
        p += w * ph
        lo2 += (w * (ph - lh)) ** 2
        hi2 += (w * (uh - ph)) ** 2
        n_all, k_all = n_all + nh, k_all + kh
    lo, hi = max(0.0, p - math.sqrt(lo2)), min(1.0, p + math.sqrt(hi2))
    return StratEstimate(p, (lo, hi), max(hi - p, p - lo), n_all, int(round(k_all)), N)


def predicted_margin(N: Sequence[int], n: Sequence[int], p: Sequence[float],
                     confidence: float, method: str = "wilson") -> float:
    """Margin :func:`estimate` would report with ``k_h = p_h n_h`` expected criticals."""
    return estimate([(Nh, nh, ph * nh) for Nh, nh, ph in zip(N, n, p, strict=True)],
                    confidence, method).margin if sum(N) else 0.0


def calibrate(n: Sequence[int], k: Sequence[int], priors: Sequence[float],
              strength: float = 2.0) -> np.ndarray:
    """Pilot-calibrated rates ``(k_h + strength π_h) / (n_h + strength)``.

    >>> calibrate([0, 10], [0, 5], [0.1, 0.9]).round(3).tolist()
    [0.1, 0.567]
    """
    n_, k_, pi = (np.asarray(a, dtype=np.float64) for a in (n, k, priors))
    return (k_ + strength * pi) / (n_ + strength)


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
             audit: int = 30, have: Sequence[int] | None = None, method: str = "wilson",
             budget: int | None = None) -> np.ndarray:
    """Faults per sub-stratum (at least ``have`` and the audit) until the predicted margin
    at rates ``p`` is at most ``error``: each step adds ~10 % to the sub-stratum with the
    largest margin reduction per fault (``budget`` caps the total)."""
    N_ = np.asarray(N, dtype=np.int64)
    n = np.minimum(N_, int(audit))
    if have is not None:
        n = np.maximum(n, np.asarray(have, dtype=np.int64))
    cur = predicted_margin(N_, n, p, confidence, method)
    while cur > error and (budget is None or n.sum() < budget):
        best, best_gain = -1, -math.inf
        for h in np.flatnonzero(n < N_):
            step = int(min(N_[h] - n[h], max(1, math.ceil(0.1 * n[h]))))
            trial = n.copy()
            trial[h] += step
            gain = (cur - predicted_margin(N_, trial, p, confidence, method)) / step
            if gain > best_gain:
                best, best_gain, best_n = h, gain, trial
        if best < 0:
            break
        n, cur = best_n, predicted_margin(N_, best_n, p, confidence, method)
    return n


@dataclass
class StratifiedResult:
    """Outcome of :func:`run_stratified` for one stratum."""

    key: str
    estimate: StratEstimate
    N: list[int]
    n: list[int]
    k: list[int]
    rounds: int
    drawn: dict[int, np.ndarray] = field(default_factory=dict)  # class -> fault numbers j

    @property
    def total(self) -> int:
        return int(sum(self.n))

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"key": self.key, "cfr": e.p, "ci": list(e.ci), "margin": e.margin,
                "n": self.total, "critical": e.k, "N": e.N, "rounds": self.rounds,
                "sub": [{"class": h, "N": Nh, "n": nh, "k": kh}
                        for h, (Nh, nh, kh) in enumerate(zip(self.N, self.n, self.k,
                                                             strict=True)) if Nh]}


def run_stratified(classes: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray], *,
                   error: float, confidence: float, seed: int = 0, key: str = "",
                   audit: int = 30, method: str = "wilson",
                   priors: Sequence[float] = CLASS_PRIORS, sequential: bool = False,
                   max_rounds: int = 12, undershoot: float = 0.9,
                   n_classes: int | None = None) -> StratifiedResult:
    """Sequential criticality-stratified estimate of one stratum's CFR.

    ``classes[j]``: predicted class of stratum-local fault ``j``; ``evaluate(j_array)`` runs
    the faults and returns whether each is critical. Round 0 is the audit/pilot; each later
    round calibrates the rates, allocates (aiming at ``undershoot * error``) and draws the
    missing faults, until ``margin <= error`` or everything is enumerated.

    >>> res = run_stratified(cls, lambda j: truth[j], error=0.01, confidence=0.99)  # doctest: +SKIP
    """
    classes = np.asarray(classes)
    H = int(n_classes or max(len(priors), int(classes.max()) + 1 if classes.size else 0))
    N = np.bincount(classes.astype(np.int64), minlength=H)[:H]
    pri = np.resize(np.asarray(priors, dtype=np.float64), H)
    n, k = np.zeros(H, np.int64), np.zeros(H, np.int64)
    drawn: dict[int, list[np.ndarray]] = {h: [] for h in range(H)}
    target = np.minimum(N, audit)
    rounds = 0
    for rnd in range(max_rounds + 1):
        for h in np.flatnonzero(target > n):
            local = np.concatenate(drawn[h]) if drawn[h] else np.zeros(0, np.int64)
            kk, jj = draw(classes, h, int(target[h] - n[h]), seed, substratum_key(key, h),
                          rnd, exclude=local)
            drawn[h].append(kk)
            crit = np.asarray(evaluate(jj), dtype=bool)
            n[h] += len(jj)
            k[h] += int(crit.sum())
        rounds = rnd
        est = estimate(list(zip(N, n, k, strict=True)), confidence, method)
        if est.margin <= error or (n >= N).all() or (rnd >= 1 and not sequential):
            break
        target = allocate(N, calibrate(n, k, pri), undershoot * error, confidence, audit, n,
                          method)
        if (target <= n).all():  # predicted done but not achieved: grow the widest cell
            w = np.array([(Nh / N.sum()) * np.subtract(*sub_interval(Nh, nh, kh, confidence,
                                                                    method)[::-1])
                          if nh < Nh else -1.0 for Nh, nh, kh in zip(N, n, k, strict=True)])
            h = int(np.argmax(w))
            target = n.copy()
            target[h] = min(N[h], n[h] + max(1, math.ceil(0.25 * n[h])))
    members = {h: np.flatnonzero(classes == h) for h in range(H) if drawn[h]}
    picked = {h: members[h][np.concatenate(drawn[h])] for h in members}
    return StratifiedResult(key, est, N.tolist(), n.tolist(), k.tolist(), rounds, picked)
