"""Confidence sequences for the mean of bounded terms, valid under optional stopping.

Setting: terms ``x_1, x_2, ...`` with a common conditional mean ``E[x_i | past] = m`` and
``x_i`` in ``[lo_i, hi_i]``, where the range may change but is known *before* ``x_i`` is
drawn (a martingale-difference setting: plain Monte Carlo, importance sampling with a fixed
proposal, and an adaptive proposal re-fitted on earlier batches all fit). A confidence
sequence (CS) is a sequence of intervals ``C_n`` with ``P(m in C_n for every n) >=
confidence``, so the interval at a data-dependent stopping time (``stop when the half-width
<= target``) keeps its level, and so does the interval at any fixed ``n``.

* :class:`BettingCS` (``"betting-cs"``, the default): two one-sided betting capital
  processes (Waudby-Smith & Ramdas, *Estimating means of bounded random variables by
  betting*, JRSS-B 2024) at level ``(1 - confidence) / 2`` each:
  ``K+_n(m) = prod (1 + l+_i(m) (x_i - m))`` and ``K-_n(m) = prod (1 - l-_i(m) (x_i - m))``
  with predictable bets ``l_i = min(b_i, c / (m - lo_i))`` (resp. ``c / (hi_i - m)``);
  under the true ``m`` both are non-negative martingales, so by Ville's inequality ``m`` is
  rejected (``K >= 2 / (1 - confidence)`` at some time) with probability at most
  ``(1 - confidence) / 2`` per side. Each ``K`` is monotone in ``m``, so the rejected sets are
  half-lines and the CS (running intersection over all times) is an interval. Computed on a
  grid of candidate means (log space, vectorised) that is refined, by replaying the stored
  terms, whenever the interval spans too few grid points; the reported ends are rejected grid
  points (or the domain ends), so the grid only ever widens the interval.
* :class:`EmpiricalBernsteinCS` (``"eb-cs"``): the predictable-plug-in empirical-Bernstein
  CS of the same paper (closed form, one global range ``[lo, hi]``).

Bet sizes ``b_i`` use the predictable variance estimate ``s2_{i-1}`` and are tuned for the
target: ``margin / s2`` (the bet that reaches half-width ``margin`` soonest), or
``sqrt(2 log(2/a) / (s2 * horizon))`` for a fixed horizon (the larger of the two when both
are given), else the time-uniform ``sqrt(2 log(2/a) / (s2 * t log(1 + t)))``. The tuning
never affects validity, only width.

>>> import numpy as np
>>> x = np.random.default_rng(0).binomial(1, 0.3, 2000).astype(float)
>>> cs = BettingCS(0.95, 0.0, 1.0, horizon=2000)
>>> cs.update(x, 0.0, 1.0)
>>> lo, hi = cs.interval()
>>> bool(lo < 0.3 < hi), bool(hi - lo < 0.1)
(True, True)
"""

from __future__ import annotations

import math

import numpy as np

from flipguard.errors import ConfigError

BET_CAP = 0.9
"""Default ``c`` of :class:`BettingCS`: a bet may lose at most this fraction of the capital
on a worst-case term (measured: 0.9 needs 10-15 % fewer samples than 0.75 on the toy and
digits benchmarks, also when heavy terms near the bound occur; validity holds for any
``c < 1``)."""

__all__ = ["BET_CAP", "reach", "samples_needed", "ConfidenceSequence", "BettingCS",
           "EmpiricalBernsteinCS", "INTERVALS", "make_cs"]

INTERVALS = ("betting-cs", "eb-cs", "clt")
"""Interval methods of :func:`flipguard.ra.estimate_ra` (``clt``: the normal interval, not
valid under sequential stopping; kept for comparison)."""


class ConfidenceSequence:
    """Shared part: predictable mean/variance estimates and bet sizes.

    ``lo``/``hi`` bound the mean (the CS never leaves ``[lo, hi]``); ``prior_mean`` and
    ``prior_var`` start the plug-in estimates (one pseudo-sample).
    """

    name = ""

    def __init__(self, confidence: float, lo: float, hi: float, margin: float = 0.0,
                 horizon: int | None = None, prior_mean: float | None = None,
                 prior_var: float | None = None) -> None:
        if not 0 < confidence < 1:
            raise ConfigError(f"--confidence: expected a value in (0, 1), got {confidence}")
        if not hi > lo:
            raise ConfigError(f"confidence sequence: expected lo < hi, got [{lo}, {hi}]")
        self.confidence, self.lo, self.hi = float(confidence), float(lo), float(hi)
        self.margin = float(margin)
        self.horizon = None if horizon is None else max(int(horizon), 1)
        self.threshold = math.log(2.0 / (1.0 - confidence))  # per side, level (1 - c) / 2
        self.mu0 = 0.5 * (lo + hi) if prior_mean is None else float(prior_mean)
        self.var0 = (0.25 * (hi - lo) ** 2) if prior_var is None else float(prior_var)
        self.n, self.s, self.v = 0, 0.0, 0.0  # count, sum, sum of squared predictable devs

    def _bets(self, x: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Predictable bet sizes ``b_i`` for the new terms ``x`` (in units of ``x / scale``)
        and advance the plug-in state."""
        k = x.size
        before = self.n + np.arange(k, dtype=np.float64)  # terms seen before each one
        s_prev = self.s + np.concatenate(([0.0], np.cumsum(x)[:-1]))
        mu_prev = (self.mu0 + s_prev) / (before + 1.0)
        dev = (x - mu_prev) ** 2
        v_prev = self.v + np.concatenate(([0.0], np.cumsum(dev)[:-1]))
        var = np.maximum((self.var0 + v_prev) / (before + 1.0), 1e-300) / scale ** 2
        self.n += k
        self.s += float(x.sum())
        self.v += float(dev.sum())
        t = before + 1.0
        cand = []
        if self.margin > 0:
            cand.append(self.margin / scale / var)
        if self.horizon is not None:
            cand.append(np.sqrt(2 * self.threshold / (var * self.horizon)))
        if not cand:
            cand.append(np.sqrt(2 * self.threshold / (var * t * np.log1p(t))))
        return np.minimum(np.maximum.reduce(cand), 1e12)

    def update(self, x: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> None:
        raise NotImplementedError  # pragma: no cover

    def interval(self) -> tuple[float, float]:
        raise NotImplementedError  # pragma: no cover

    def half_width(self) -> float:
        lo, hi = self.interval()
        return 0.5 * (hi - lo)


def _as_range(x: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    lo_a = np.broadcast_to(np.asarray(lo, dtype=np.float64), x.shape).astype(np.float64)
    hi_a = np.broadcast_to(np.asarray(hi, dtype=np.float64), x.shape).astype(np.float64)
    slack = 1e-9 * np.maximum(1.0, hi_a - lo_a)
    if not np.isfinite(x).all() or (x < lo_a - slack).any() or (x > hi_a + slack).any():
        raise ConfigError("confidence sequence: a term lies outside its stated bounds "
                          "(is the weight bound right?)")
    return np.clip(x, lo_a, hi_a), lo_a, hi_a


class BettingCS(ConfidenceSequence):
    """Two one-sided betting confidence sequences (see the module docstring); ``c`` < 1
    caps a bet at the fraction of capital a worst-case term may cost, ``grid`` is the number
    of candidate means evaluated at once."""

    name = "betting-cs"

    def __init__(self, confidence: float, lo: float, hi: float, margin: float = 0.0,
                 horizon: int | None = None, prior_mean: float | None = None,
                 prior_var: float | None = None, c: float = BET_CAP, grid: int = 256) -> None:
        super().__init__(confidence, lo, hi, margin, horizon, prior_mean, prior_var)
        if not 0 < c < 1:
            raise ConfigError(f"betting CS: c must be in (0, 1), got {c}")
        self.c, self.size = float(c), max(int(grid), 16)
        self._hist: list[tuple[np.ndarray, ...]] = []  # (x, lo, hi, bets) per update
        self._set_grid(self.lo, self.hi)
        self.L, self.U = self.lo, self.hi

    def _set_grid(self, a: float, b: float) -> None:
        self.m = np.linspace(a, b, self.size)
        self.logk = np.zeros((2, self.size))
        self.rej = np.zeros((2, self.size), dtype=bool)

    def _advance(self, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bets: np.ndarray,
                 chunk: int = 1024) -> None:
        """Add terms to the capitals of the grid points still inside the interval
        (rejections at every time; a rejected point stays rejected)."""
        a, b = self._bracket()
        cols = slice(a + 1, b) if b > a + 1 else slice(0, 0)
        m, c = self.m[None, cols], self.c
        if not m.size:
            return
        for start in range(0, x.size, chunk):
            sl = slice(start, start + chunk)
            xs, ls, hs, bs = (v[sl, None] for v in (x, lo, hi, bets))
            dev = xs - m
            with np.errstate(divide="ignore"):
                up = np.log1p(np.minimum(bs, np.where(m > ls, c / (m - ls), np.inf)) * dev)
                dn = np.log1p(-np.minimum(bs, np.where(hs > m, c / (hs - m), np.inf)) * dev)
            for side, f in enumerate((up, dn)):
                path = np.cumsum(f, axis=0)
                path += self.logk[side, cols]
                self.rej[side, cols] |= path.max(axis=0) >= self.threshold
                self.logk[side, cols] = path[-1]

    def _bracket(self) -> tuple[int, int]:
        up, dn = np.flatnonzero(self.rej[0]), np.flatnonzero(self.rej[1])
        return (int(up.max()) if up.size else 0), (int(dn.min()) if dn.size else self.size - 1)

    def update(self, x: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float,
               step: int = 64) -> None:
        """Add terms ``x`` with their bounds ``lo <= x <= hi`` (scalars or one per term), in
        order; the grid is checked for refinement every ``step`` terms."""
        x, lo_a, hi_a = _as_range(x, lo, hi)
        for a in range(0, x.size, step):
            sl = slice(a, a + step)
            self._update(x[sl], lo_a[sl], hi_a[sl])

    def _update(self, x: np.ndarray, lo_a: np.ndarray, hi_a: np.ndarray) -> None:
        if not x.size:
            return
        bets = self._bets(x)
        self._hist.append((x, lo_a, hi_a, bets))
        self._advance(x, lo_a, hi_a, bets)
        tol = 1e-9 * (self.hi - self.lo)
        while True:
            a, b = self._bracket()
            self.L, self.U = float(self.m[a]), float(self.m[b])
            if b <= a:  # both sides rejected a common point: empty CS, report the crossing
                self.L = self.U = 0.5 * (self.L + self.U)
                return
            if b - a - 1 >= self.size // 4 or self.U - self.L <= tol:
                return
            self._set_grid(self.L, self.U)  # finer grid inside the bracket: replay
            for h in self._hist:
                self._advance(*h)

    def interval(self) -> tuple[float, float]:
        """``(low, high)`` of the running intersection so far (``[lo, hi]`` before data)."""
        return self.L, self.U


class EmpiricalBernsteinCS(ConfidenceSequence):
    """Predictable-plug-in empirical-Bernstein CS (Waudby-Smith & Ramdas 2024, Thm 2) for
    terms in one global range ``[term_lo, term_hi]`` (mapped to [0, 1]); ``c`` caps the
    bets (in [0, 1) units)."""

    name = "eb-cs"

    def __init__(self, confidence: float, lo: float, hi: float, margin: float = 0.0,
                 horizon: int | None = None, term_lo: float | None = None,
                 term_hi: float | None = None, c: float = 0.5,
                 prior_mean: float | None = None) -> None:
        self.tlo = lo if term_lo is None else float(term_lo)
        self.thi = hi if term_hi is None else float(term_hi)
        r = self.thi - self.tlo
        pm = None if prior_mean is None else (prior_mean - self.tlo) / r
        super().__init__(confidence, lo, hi, margin / r, horizon, pm, 0.25)
        self.mu0 = 0.5 if prior_mean is None else pm
        if not 0 < c < 1:
            raise ConfigError(f"empirical-Bernstein CS: c must be in (0, 1), got {c}")
        self.c, self.sl, self.sly, self.pen = float(c), 0.0, 0.0, 0.0
        self.L, self.U = self.lo, self.hi

    def update(self, x: np.ndarray, lo: np.ndarray | float = 0.0,
               hi: np.ndarray | float = 0.0) -> None:
        """Add terms ``x`` (they must lie in the global range given at construction)."""
        x, _, _ = _as_range(x, self.tlo, self.thi)
        if not x.size:
            return
        r = self.thi - self.tlo
        y = (x - self.tlo) / r
        s_prev = self.s + np.concatenate(([0.0], np.cumsum(y)[:-1]))
        mu_prev = (self.mu0 + s_prev) / (self.n + np.arange(y.size) + 1.0)
        lam = np.minimum(self._bets(y), self.c)
        psi = (-np.log1p(-lam) - lam) / 4
        sl = self.sl + np.cumsum(lam)
        sly = self.sly + np.cumsum(lam * y)
        pen = self.pen + np.cumsum(4 * (y - mu_prev) ** 2 * psi)
        self.sl, self.sly, self.pen = float(sl[-1]), float(sly[-1]), float(pen[-1])
        low = self.tlo + r * (sly - self.threshold - pen) / sl
        high = self.tlo + r * (sly + self.threshold + pen) / sl
        self.L = max(self.L, float(low.max()))
        self.U = min(self.U, float(high.min()))

    def interval(self) -> tuple[float, float]:
        if self.L > self.U:
            mid = 0.5 * (self.L + self.U)
            return mid, mid
        return self.L, self.U


def reach(n: float, var: float, mean: float, term_lo: float, term_hi: float,
          confidence: float = 0.95, c: float | None = None) -> float:
    """Predicted half-width of :class:`BettingCS` after ``n`` terms of variance ``var``, mean
    ``mean`` and range ``[term_lo, term_hi]``: the mean of the one-sided distances ``delta``
    with
    ``n * G(delta) = log(2 / (1 - confidence))``, ``G`` the growth rate of the best allowed
    bet ``l = min(delta / var, c / range left)``, ``G = l delta - l^2 var / 2`` (second
    order). For tuning only (e.g. the defensive share of an adaptive proposal).

    >>> round(reach(10_000, 0.01, 0.0, -1.0, 1.0), 4)  # ~ sqrt(2 log(40) var / n)
    0.0027
    """
    c = BET_CAP if c is None else c
    thr, var = math.log(2.0 / (1.0 - confidence)), max(var, 1e-300)
    out = []
    for room in (lambda d: mean - d - term_lo, lambda d: term_hi - mean - d):
        lo_d, hi_d = 0.0, term_hi - term_lo
        for _ in range(60):
            d = 0.5 * (lo_d + hi_d)
            left = room(d)
            lam = d / var if left <= 0 else min(d / var, c / left)
            if n * (lam * d - 0.5 * lam * lam * var) >= thr:
                hi_d = d
            else:
                lo_d = d
        out.append(hi_d)
    return 0.5 * (out[0] + out[1])


def samples_needed(margin: float, var: float, mean: float, term_lo: float, term_hi: float,
                   confidence: float = 0.95, c: float | None = None) -> int:
    """Smallest ``n`` whose predicted :class:`BettingCS` half-width (:func:`reach`) is
    ``<= margin`` (planning: the valid-interval counterpart of ``(z sd / margin)^2``).

    >>> samples_needed(0.0025, 0.0084, 0.013, -0.028, 0.972)  # MC, digits-CNN-like
    9916
    """
    lo, hi = 1, 2
    while reach(hi, var, mean, term_lo, term_hi, confidence, c) > margin:
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reach(mid, var, mean, term_lo, term_hi, confidence, c) > margin:
            lo = mid
        else:
            hi = mid
    return hi


def make_cs(method: str, confidence: float, lo: float, hi: float, *, margin: float = 0.0,
            horizon: int | None = None, term_lo: float | None = None,
            term_hi: float | None = None, prior_mean: float | None = None,
            c: float | None = None) -> ConfidenceSequence:
    """The confidence sequence ``method`` (``betting-cs`` | ``eb-cs``) for a mean in
    ``[lo, hi]``; ``term_lo``/``term_hi``: the widest range a term can have (``eb-cs``).

    >>> make_cs("betting-cs", 0.95, -0.1, 0.9).interval()
    (-0.1, 0.9)
    """
    if method == "betting-cs":
        return BettingCS(confidence, lo, hi, margin, horizon, prior_mean,
                         prior_var=0.25 * (hi - lo) ** 2, c=BET_CAP if c is None else c)
    if method == "eb-cs":
        return EmpiricalBernsteinCS(confidence, lo, hi, margin, horizon, term_lo, term_hi,
                                    0.5 if c is None else c, prior_mean)
    raise ConfigError(f"interval: expected one of {', '.join(INTERVALS[:2])}, got {method!r}")
