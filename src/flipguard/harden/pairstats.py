"""Weighted (stratified) paired comparison of the CFR before vs after hardening.

The same faults are classified before and after hardening. In stratum ``h`` (population
``N_h``, weight ``W_h = N_h / sum N``, ``n_h`` faults sampled) each fault falls into one of
four cells: ``00`` (never critical), ``10`` (fixed: critical before, not after), ``11``
(still critical) and ``01`` (broken). With ``F``, ``S``, ``K`` the stratified rates of the
cells ``10``, ``11``, ``01``::

    CFR_before = F + S,   CFR_after = S + K,   D = sum_h W_h (p_h,before - p_h,after) = F - K
    R = 1 - CFR_after / CFR_before = (F - K) / (F + S)

* **Test of D = 0** (:func:`difference_p_value`): the two-sided p-value is the level at
  which the MOVER interval of ``D`` (below) just reaches 0, so the test and the reported
  interval always agree (``p < 1 - confidence`` iff the interval of ``R`` excludes 0). It
  holds for the *population* null ``D = 0`` even when strata improve and degrade in ways
  that cancel, where McNemar (every pair alike) rejects in most samples.
* **Sign-flip test** (:func:`sign_flip_test`, reported next to it): the exact stratified
  McNemar test of the sharp null "hardening changes no fault's outcome in any stratum":
  each discordant pair is fixed or broken with probability 1/2 and the statistic is the
  weighted estimate ``T = sum_h (W_h / n_h) (fixed_h - broken_h)``; exact by enumeration
  when the null support is small, else a seeded Monte Carlo p-value ``(1 + #{|T*| >= |T|}) /
  (1 + B)``. It is *not* valid for the weaker population null when a few heavy strata have
  only a handful of discordant pairs (tests/test_pairstats.py).
* **Interval** (:func:`improvement_interval`): MOVER-R (Newcombe 2016; Zou & Donner 2008)
  for the ratio. ``R >= r`` iff ``G(r) = (1 - r) F - r S - K >= 0``; the interval is the set of
  ``r`` whose MOVER interval of ``G(r)`` contains 0, built from one interval per cell rate.
  Each cell rate gets the exact (Clopper-Pearson) interval of each stratum with its finite-
  population correction, combined over strata by the MOVER root sum of squares of the
  distances. A stratum with no critical fault keeps its exact upper distance (about
  ``3.7 / n_h`` at 95 %): it may hold critical faults that the hardening removes (``F``,
  upper end of ``R``) or does not remove (``S``, lower end of ``R``) -- the bootstrap gives it
  none. Strata never sampled (share ``unsampled``) carry no information; the interval
  describes the sampled population and ``unsampled`` is reported next to it.

Coverage of both against the old unweighted McNemar / paired bootstrap: tests/test_pairstats.py
and ``benchmarks/coverage_harden.py``.

>>> cells = [PairCell(1000, 100, 90, 0, 10, 0), PairCell(9000, 100, 99, 0, 0, 1)]
>>> r = compare_paired(cells)
>>> round(r.relative_improvement, 3), r.ci[0] < r.relative_improvement < r.ci[1]
(0.526, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import betaincinv

from flipguard.errors import ConfigError

__all__ = ["PairCell", "PairedComparison", "compare_paired", "difference_interval",
           "difference_p_value", "improvement_interval", "pair_cells", "sign_flip_test"]

EXACT_SUPPORT = 200_000
"""Largest null support enumerated exactly by :func:`sign_flip_test`."""


@dataclass(frozen=True)
class PairCell:
    """One stratum: population ``N``, sampled ``n`` and the paired counts ``n00`` (never
    critical), ``n01`` (broken), ``n10`` (fixed), ``n11`` (critical before and after)."""

    N: int
    n: int
    n00: int
    n01: int
    n10: int
    n11: int

    def __post_init__(self) -> None:
        if self.n01 + self.n10 + self.n11 + self.n00 != self.n or self.n > self.N:
            raise ConfigError(f"pair cell: counts {self.n00, self.n01, self.n10, self.n11} "
                              f"must sum to n = {self.n} <= N = {self.N}")


def pair_cells(before: np.ndarray, after: np.ndarray, strata: Sequence[str],
               N: dict[str, int]) -> list[PairCell]:
    """Per-stratum paired counts of per-fault flags; strata of ``N`` with no fault get
    ``n = 0`` (unsampled).

    >>> pair_cells(np.array([1, 1, 0]), np.array([0, 1, 0]), ["a", "a", "b"],
    ...            {"a": 10, "b": 20, "c": 5})[0]
    PairCell(N=10, n=2, n00=0, n01=0, n10=1, n11=1)
    """
    b, a = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    keys = np.asarray(list(strata))
    out = []
    for k in dict.fromkeys(list(strata) + list(N)):
        sel = keys == k
        bb, aa = b[sel], a[sel]
        out.append(PairCell(int(N[k]), int(sel.sum()), int((~bb & ~aa).sum()),
                            int((~bb & aa).sum()), int((bb & ~aa).sum()), int((bb & aa).sum())))
    return out


def _sampled(cells: Sequence[PairCell]) -> tuple[list[PairCell], np.ndarray, float]:
    total = sum(c.N for c in cells if c.N > 0)
    used = [c for c in cells if c.n > 0 and c.N > 0]
    n_used = sum(c.N for c in used)
    w = np.array([c.N / n_used for c in used]) if used else np.zeros(0)
    return used, w, (1.0 - n_used / total) if total else 0.0


def _exact_two_sided(c: np.ndarray, m: np.ndarray, t: float) -> float | None:
    """P(|T*| >= |t|) by enumeration, None when the support is too large."""
    from scipy.stats import binom

    dist: dict[float, float] = {0.0: 1.0}
    for ch, mh in zip(c.tolist(), m.tolist(), strict=True):
        if mh == 0:
            continue
        pmf = binom.pmf(np.arange(mh + 1), mh, 0.5)
        new: dict[float, float] = {}
        for v, p in dist.items():
            for j in range(mh + 1):
                key = round(v + ch * (2 * j - mh), 12)
                new[key] = new.get(key, 0.0) + p * float(pmf[j])
        if len(new) > EXACT_SUPPORT:
            return None
        dist = new
    tol = 1e-9 * max(abs(t), 1e-300)
    return min(1.0, sum(p for v, p in dist.items() if abs(v) >= abs(t) - tol))


def sign_flip_test(cells: Sequence[PairCell], n_mc: int = 100_000, seed: int = 0
                   ) -> tuple[float, str]:
    """Two-sided weighted sign-flip p-value of "hardening changes nothing" and how it was
    computed ("exact" | "monte-carlo" | "none" when no pair is discordant).

    >>> p, how = sign_flip_test([PairCell(100, 10, 5, 0, 5, 0)])  # 5 of 5 fixed: 2 * 2**-5
    >>> round(p, 12), how
    (0.0625, 'exact')
    """
    used, w, _ = _sampled(cells)
    if not used:
        return 1.0, "none"
    n = np.array([c.n for c in used], dtype=float)
    fixed = np.array([c.n10 for c in used])
    broken = np.array([c.n01 for c in used])
    m = fixed + broken
    if m.sum() == 0:
        return 1.0, "none"
    coef = w / n
    t = float((coef * (fixed - broken)).sum())
    exact = _exact_two_sided(coef, m, t)
    if exact is not None:
        return exact, "exact"
    rng = np.random.Generator(np.random.PCG64(seed))
    live = m > 0
    cl, ml = coef[live], m[live]
    hits = 0
    for start in range(0, n_mc, 20_000):
        size = min(20_000, n_mc - start)
        x = rng.binomial(ml, 0.5, size=(size, ml.size))
        tt = ((2 * x - ml) * cl).sum(axis=1)
        hits += int((np.abs(tt) >= abs(t) * (1 - 1e-9)).sum())
    return (1 + hits) / (1 + n_mc), "monte-carlo"


def _cp_distances(k: np.ndarray, n: np.ndarray, N: np.ndarray, confidence: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-stratum (p - lo, hi - p) of exact intervals with the finite-population correction
    through the effective size ``n (N - 1) / (N - n)`` (0, 0 for exhaustive strata)."""
    alpha = 1.0 - confidence
    p = k / n
    full = n >= N
    n_eff = np.where(full, n, n * (N - 1) / np.maximum(N - n, 1))
    ke = p * n_eff
    lo = np.where(ke > 0, betaincinv(np.maximum(ke, 1e-300), n_eff - ke + 1, alpha / 2), 0.0)
    hi = np.where(ke < n_eff, betaincinv(ke + 1, np.maximum(n_eff - ke, 1e-300),
                                         1 - alpha / 2), 1.0)
    lo, hi = np.where(full, p, lo), np.where(full, p, hi)
    return p - lo, hi - p


def _parts(cells: Sequence[PairCell], confidence: float) -> dict[str, tuple[float, float, float]]:
    """``{"F"|"S"|"K": (estimate, lower distance, upper distance)}`` (MOVER over strata)."""
    used, w, _ = _sampled(cells)
    n = np.array([c.n for c in used], dtype=float)
    N = np.array([c.N for c in used], dtype=float)
    out = {}
    for name, attr in (("F", "n10"), ("S", "n11"), ("K", "n01")):
        k = np.array([getattr(c, attr) for c in used], dtype=float)
        dlo, dhi = _cp_distances(k, n, N, confidence)
        out[name] = (float((w * k / n).sum()), float(np.sqrt(((w * dlo) ** 2).sum())),
                     float(np.sqrt(((w * dhi) ** 2).sum())))
    return out


def _g_bounds(r: float, parts: dict[str, tuple[float, float, float]]) -> tuple[float, float]:
    """MOVER interval of ``G(r) = (1 - r) F - r S - K``."""
    coef = {"F": 1.0 - r, "S": -r, "K": -1.0}
    est = sum(coef[j] * parts[j][0] for j in coef)
    lo2 = sum((c * parts[j][1 if c >= 0 else 2]) ** 2 for j, c in coef.items())
    hi2 = sum((c * parts[j][2 if c >= 0 else 1]) ** 2 for j, c in coef.items())
    return est - math.sqrt(lo2), est + math.sqrt(hi2)


def difference_interval(cells: Sequence[PairCell], confidence: float = 0.95
                        ) -> tuple[float, float]:
    """MOVER interval of ``D = CFR_before - CFR_after = F - K`` (= ``G(0)``)."""
    return _g_bounds(0.0, _parts(cells, confidence))


def difference_p_value(cells: Sequence[PairCell]) -> float:
    """Two-sided p-value of ``D = 0``: the ``alpha`` at which the ``1 - alpha`` interval of
    :func:`difference_interval` has an end at 0 (1 when ``D`` is estimated as 0).

    >>> f"{difference_p_value([PairCell(10**6, 50, 40, 0, 10, 0)]):.2g}"  # 10 of 50 fixed
    '0.001'
    """
    used, _, _ = _sampled(cells)
    parts = _parts(cells, 0.5)
    d = parts["F"][0] - parts["K"][0]
    if not used or d == 0:
        return 1.0

    def gap(log_alpha: float) -> float:  # increasing in alpha: narrower intervals
        lo, hi = difference_interval(cells, 1.0 - 10.0 ** log_alpha)
        return lo if d > 0 else -hi

    top = math.log10(1.0 - 1e-9)
    if gap(top) <= 0:
        return 1.0
    if gap(-300.0) > 0:
        return 1e-300
    return float(10.0 ** brentq(gap, -300.0, top, xtol=1e-10))


def improvement_interval(cells: Sequence[PairCell], confidence: float = 0.95,
                         floor: float = -1e6) -> tuple[float, float]:
    """MOVER-R interval of ``R = 1 - CFR_after / CFR_before`` (see module docstring); the
    lower end is ``-inf`` when the data cannot exclude arbitrarily large harm; NaN, NaN when
    nothing was critical before."""
    parts = _parts(cells, confidence)
    b = parts["F"][0] + parts["S"][0]
    if not b > 0:
        return float("nan"), float("nan")
    r_hat = (parts["F"][0] - parts["K"][0]) / b
    # lower end: G's lower bound (concave in r, <= 0 at r_hat) crosses 0 below r_hat
    low = lambda r: _g_bounds(r, parts)[0]  # noqa: E731
    if low(floor) <= 0:
        lo = -math.inf
    else:
        lo = brentq(low, floor, r_hat, xtol=1e-12) if low(r_hat) < 0 else r_hat
    # upper end: the last r in [r_hat, 1] where G's upper bound is still >= 0 (scanned, as
    # the convex bound may dip below 0 and come back before r = 1)
    high = lambda r: _g_bounds(r, parts)[1]  # noqa: E731
    grid = np.linspace(r_hat, 1.0, 201)
    ok = np.flatnonzero([high(r) >= 0 for r in grid])
    j = int(ok[-1]) if ok.size else 0
    hi = float(grid[j]) if j == grid.size - 1 or high(grid[j]) < 0 else float(
        brentq(high, grid[j], grid[j + 1], xtol=1e-12))
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedComparison:
    """Result of :func:`compare_paired` (rates over the sampled strata)."""

    cfr_before: float
    cfr_after: float
    difference: float
    difference_ci: tuple[float, float]
    relative_improvement: float
    ci: tuple[float, float]
    confidence: float
    p_value: float
    p_sign_flip: float
    p_sign_flip_method: str
    fixed: int
    broken: int
    unsampled_share: float
    zero_critical_share: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"], d["difference_ci"] = list(self.ci), list(self.difference_ci)
        d["test"] = "MOVER inversion for D = 0 (weighted); sign-flip: stratified McNemar"
        d["interval"] = "MOVER-R over per-stratum exact (Clopper-Pearson, FPC) bounds"
        return d


def compare_paired(cells: Sequence[PairCell], confidence: float = 0.95, n_mc: int = 100_000,
                   seed: int = 0) -> PairedComparison:
    """Weighted paired comparison of per-stratum paired counts ``cells`` (module docstring).

    ``zero_critical_share``: population share of the sampled strata where no fault was
    critical before (their criticals, if any, are only bounded); ``unsampled_share``: share
    of strata with no sampled fault at all.
    """
    used, w, unsampled = _sampled(cells)
    if not used:
        nan = float("nan")
        return PairedComparison(nan, nan, nan, (nan, nan), nan, (nan, nan), confidence, 1.0,
                                1.0, "none", 0, 0, unsampled, 0.0)
    n = np.array([c.n for c in used], dtype=float)
    f = np.array([c.n10 for c in used], dtype=float)
    s = np.array([c.n11 for c in used], dtype=float)
    k = np.array([c.n01 for c in used], dtype=float)
    before, after = float((w * (f + s) / n).sum()), float((w * (s + k) / n).sum())
    rel = (before - after) / before if before > 0 else float("nan")
    p, how = sign_flip_test(cells, n_mc, seed)
    zero = float(w[(f + s) == 0].sum()) * (1.0 - unsampled)
    return PairedComparison(before, after, before - after,
                            difference_interval(cells, confidence), rel,
                            improvement_interval(cells, confidence), confidence,
                            difference_p_value(cells), p, how, int(f.sum()), int(k.sum()),
                            unsampled, zero)
