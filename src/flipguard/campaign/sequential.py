"""Sub-stratum CFR estimate that stays unbiased across adaptive rounds.

A sub-stratum holds ``N`` faults, ``K`` of them critical. Round 0 audits ``n0`` (``k0``
critical, counted exactly as themselves). Round ``t >= 1`` draws ``n_t`` of the
``R_t = N - n0 - n_1 - ... - n_{t-1}`` faults not drawn yet, uniformly without replacement,
its size chosen from everything seen before (any rule). Its Horvitz–Thompson estimate of the
total, the faults drawn before counted exactly and the rest by the round's rate
``q_t = k_t / n_t``,

    T_t = k0 + k_1 + ... + k_{t-1} + R_t q_t,        E[T_t | rounds < t] = K,

is conditionally unbiased whatever the earlier rounds were. Weights fixed *before* each round
is drawn keep that: ``w_t = λ_t B_{t-1}`` (``B`` the weight not given yet, ``B_0 = 1``) with
``λ_t`` a function of the earlier rounds, and ``λ = 1`` for a round known, before it is drawn,
to be the last. Then ``sum w_t = 1`` and ``K^ = sum w_t T_t`` is exactly unbiased:
``E[K^ - K] = sum E[w_t E[T_t - K | rounds < t]] = 0``. Per round,

    K^ = k0 + sum B_t k_t + sum w_t R_t q_t,      K^ - K = sum w_t R_t (q_t - ρ_t),

``ρ_t`` the rate of the ``R_t`` faults left before round ``t``: a martingale, so
``var K^ = sum E[w_t² R_t² (1 - n_t / R_t) S_t² / n_t]``, estimated without bias with the
sample variances ``s_t² = n_t q_t (1 - q_t) / (n_t - 1)`` (``S_t²`` of the ``R_t``).

Interval: ``K = k0 + sum B_t k_t + C ρ``, ``C = sum c_t``, ``c_t = w_t R_t``, ``ρ`` the
``c``-weighted mean of the ``ρ_t``, estimated by ``q = sum c_t q_t / C`` with variance
``ρ (1 - ρ) D / C²``, ``D = sum c_t² f_t / n_t``, ``f_t = (R_t - n_t) / (R_t - 1)``: the
Clopper–Pearson (or Wilson) interval of ``q`` at the Kish effective size ``C² / D`` (one round:
``n (R - 1) / (R - n)``, the usual finite-population correction), then MOVER (Zou & Donner
2008) over the sub-strata. Pooling the rounds (``k / n`` over all of them) instead is biased:
a round's size depends on the rounds before it (a sub-stratum whose top-up saw few criticals
stops sooner and keeps its underestimate).

Weights (:func:`weights`): a round that is not the last gets ``λ =`` :func:`share`, at most
:data:`PILOT_MAX` for the allocation round (round 1) and :data:`TOPUP` for a top-up; the last
round the rest. A sequential campaign therefore ends with a closing round announced before it
is drawn (:func:`flipguard.campaign.topup.plan_round`); a stopping rule that looked at the
last round's own outcome would bias any weighting of it.

>>> h = History(N=1000, n0=30, k0=0, rounds=(1, 2), n=(100, 50), k=(2, 1), prior=0.002)
>>> [round(w, 3) for w in round_weights(h)]
[0.863, 0.137]
>>> e = sequential_estimate([h], 0.95)
>>> round(e.p, 4), e.ci[0] < e.p < e.ci[1]
(0.0194, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.special import betaincinv, ndtri

from flipguard.errors import ConfigError

__all__ = ["PESSIMISM", "PILOT_MAX", "TOPUP", "History", "SeqEstimate", "as_arrays", "bounds",
           "estimate_arrays", "round_weights", "sequential_estimate", "share", "sums",
           "weights"]

PILOT_MAX = 0.9
"""Largest share of the weight the allocation round gets when more rounds follow."""
TOPUP = 0.85
"""Largest share of the remaining weight a top-up gets (the closing round gets the rest)."""
PESSIMISM = 3.0
""":func:`share` asks how a round would fare if its class's rate were ``PESSIMISM x`` the
larger of its prior and its planning rate, at most the 80 % upper bound from the faults drawn
before it."""


def _cp(q: np.ndarray, n: np.ndarray, confidence: float, method: str
        ) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised Clopper–Pearson / Wilson interval of the rate ``q`` seen in ``n`` draws
    (``k = q n`` may be fractional; ``n`` infinite: the point ``q``; ``n = 0``: [0, 1]),
    widened to contain ``q``."""
    if method not in ("wilson", "clopper-pearson"):
        raise ConfigError(f"method: expected wilson or clopper-pearson, got {method!r}")
    q, n = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (q, n)))
    q = np.clip(q, 0.0, 1.0)
    fin = np.isfinite(n) & (n > 0)
    ne = np.where(fin, n, 1.0)
    ke = q * ne
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "clopper-pearson":
            lo = np.where(ke > 0, betaincinv(np.maximum(ke, 1e-300), ne - ke + 1, alpha / 2),
                          0.0)
            hi = np.where(ke < ne, betaincinv(ke + 1, np.maximum(ne - ke, 1e-300),
                                              1 - alpha / 2), 1.0)
        else:
            z = float(ndtri(1 - alpha / 2))
            d = 1 + z * z / ne
            mid = (q + z * z / (2 * ne)) / d
            half = z / d * np.sqrt(q * (1 - q) / ne + z * z / (4 * ne * ne))
            lo = np.where(ke > 0, np.maximum(0.0, mid - half), 0.0)
            hi = np.where(ke < ne, np.minimum(1.0, mid + half), 1.0)
    none = np.isfinite(n) & (n <= 0)
    lo = np.where(fin, np.minimum(lo, q), np.where(none, 0.0, q))
    hi = np.where(fin, np.maximum(hi, q), np.where(none, 1.0, q))
    return lo, hi


def bounds(k: np.ndarray, n: np.ndarray, R: np.ndarray, confidence: float,
           method: str = "clopper-pearson") -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`flipguard.campaign.stats.interval` of ``k / n`` drawn from ``R``
    (FPC through the effective size ``n (R - 1) / (R - n)``, exact when ``n >= R``), widened
    to contain ``k / n``; ``k`` may be fractional (planning)."""
    k, n, R = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (k, n, R)))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ne = np.where(n >= R, np.inf, np.where(R > 1, n * (R - 1) / np.maximum(R - n, 1e-300),
                                               n))
    q = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    return _cp(q, np.where(n > 0, ne, 0.0), confidence, method)


def share(N, n, k, m, prior, cap):
    """``λ`` of a round of ``m`` faults that is not the last, after ``n`` faults (``k``
    critical) of the ``N`` were drawn: the ratio of its 95 % Clopper–Pearson upper distance at
    the planning rate ``(k + 2 prior) / (n + 2)`` to that at a pessimistic rate
    (:data:`PESSIMISM`), within ``[1/3, cap]`` (vectorised). A round whose precision hardly
    depends on the unknown rate keeps most of the weight; one planned from too few faults to
    see the rate (a rare "harmless" class at a tight margin) keeps about a third, so that later
    rounds can still reach the margin if the rate turns out a few times higher than planned.

    >>> round(float(share(1000, 30, 0, 100, 0.002, 0.9)), 2)     # few faults: rate hardly matters
    0.86
    >>> round(float(share(200000, 30, 0, 4441, 0.002, 0.9)), 2)  # many: a rare rate could show
    0.34
    """
    N, n, k, m, prior, cap = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (N, n, k, m, prior, cap)))
    plan = (k + 2 * prior) / (n + 2)
    up = bounds(k, n, N, 0.8)[1]
    pess = np.maximum(plan, np.minimum(PESSIMISM * np.maximum(prior, plan), up))
    rates = np.stack([plan, pess])
    hi = bounds(rates * m, np.broadcast_to(m, rates.shape), np.broadcast_to(N - n, rates.shape),
                0.95)[1]
    d = hi - rates
    ratio = np.divide(d[0], d[1], out=np.ones_like(d[0]), where=d[1] > 0)
    return np.clip(ratio, 1 / 3, np.maximum(cap, 1 / 3))


def weights(N, n, k, prior, topup: float | None = None, closed: bool = True) -> np.ndarray:
    """Weights ``w[..., t]`` of rounds ``t`` (column 0 the audit, weight 0; rounds that drew
    nothing get 0) from counts ``n, k`` of shape ``(..., T)``: ``λ_t`` (:func:`share` of the
    faults drawn before it, capped at :data:`PILOT_MAX` for round 1 and ``topup`` later) of the
    weight left, the last round that drew faults the rest (unless ``closed`` is False: another
    round will follow). Each ``w_t`` is a function of what was known before round ``t``."""
    topup = TOPUP if topup is None else topup
    n, k = np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64)
    N, prior = (np.broadcast_to(np.asarray(v, dtype=np.float64), n.shape[:-1]) for v in (N, prior))
    T = n.shape[-1]
    drawn = n[..., 1:] > 0
    last = np.where(drawn.any(-1), (drawn * np.arange(1, T)).max(-1, initial=0), 0)
    w, left = np.zeros_like(n), np.ones(n.shape[:-1])
    cn, ck = n[..., 0].copy(), k[..., 0].copy()
    for t in range(1, T):
        m = n[..., t]
        lam = share(N, cn, ck, np.maximum(m, 1), prior, PILOT_MAX if t == 1 else topup)
        if closed:
            lam = np.where(last == t, 1.0, lam)
        w[..., t] = np.where(m > 0, lam * left, 0.0)
        left = left - w[..., t]
        cn, ck = cn + m, ck + k[..., t]
    return w


def sums(N, n, k, w) -> tuple[np.ndarray, ...]:
    """``(const, C, S, D, V)`` over rounds (last axis; column 0 the audit) with weights ``w``:
    ``K^ = const + S``, ``q = S / C``, ``D`` of the Kish size ``C² / D``, ``V`` the unbiased
    variance estimate of ``K^`` (module docstring)."""
    n, k, w = (np.asarray(v, dtype=np.float64) for v in (n, k, w))
    N = np.asarray(N, dtype=np.float64)[..., None]
    R = N - np.cumsum(n, -1) + n  # faults not drawn before each round
    c, q = w * R, k / np.maximum(n, 1)
    f = np.where(R > 1, (R - n) / np.maximum(R - 1, 1), 0.0)
    s2 = np.where(n > 1, n * q * (1 - q) / np.maximum(n - 1, 1), 0.0)
    B = 1.0 - np.cumsum(w[..., 1:], -1)
    const = k[..., 0] + (B * k[..., 1:]).sum(-1)
    V = (c * c * np.maximum(1 - n / np.maximum(R, 1), 0) * s2 / np.maximum(n, 1)).sum(-1)
    return const, c.sum(-1), (c * q).sum(-1), (c * c * f / np.maximum(n, 1)).sum(-1), V


def _part(C, S, D, confidence: float, method: str) -> tuple[np.ndarray, ...]:
    """``(q, lo, hi)`` of the weighted remainder rate ``q = S / C``: interval at the Kish
    effective size ``C² / D`` (exact when ``D = 0``)."""
    C, S, D = (np.asarray(v, dtype=np.float64) for v in (C, S, D))
    q = np.clip(np.divide(S, C, out=np.zeros_like(S), where=C > 0), 0.0, 1.0)
    ne = np.where(D > 0, C * C / np.maximum(D, 1e-300), np.inf)
    return (q, *_cp(q, ne, confidence, method))


def estimate_arrays(N, n, k, prior, confidence: float, method: str = "clopper-pearson",
                    fill=None) -> tuple[np.ndarray, ...]:
    """``(p, lo, hi, var)`` of many campaigns at once: sub-strata on axis -2 (``N``,
    ``prior`` of shape ``(..., H)``), rounds on axis -1 of ``n, k`` (column 0 the audit).
    A sub-stratum with nothing drawn after the audit counts ``[k0, k0 + rest]`` with point
    ``k0 + rest * fill`` (default: the rate seen, 1/2 when nothing was)."""
    n, k = np.asarray(n, dtype=np.float64), np.asarray(k, dtype=np.float64)
    N = np.broadcast_to(np.asarray(N, dtype=np.float64), n.shape[:-1])
    const, C, S, D, V = sums(N, n, k, weights(N, n, k, prior))
    q, lo, hi = _part(C, S, D, confidence, method)
    seen_n, seen_k = n.sum(-1), k.sum(-1)
    if fill is None:
        fill = np.divide(seen_k, seen_n, out=np.full_like(seen_k, 0.5), where=seen_n > 0)
    rest = N - n[..., 0]
    none = (n[..., 1:].sum(-1) <= 0) & (rest > 0)
    point = np.where(none, k[..., 0] + rest * fill, const + S)
    d_lo = np.where(none, rest * fill, C * (q - lo))
    d_hi = np.where(none, rest * (1 - fill), C * (hi - q))
    tot = N.sum(-1)
    p = point.sum(-1) / tot
    lo_ = np.maximum(0.0, p - np.sqrt((d_lo ** 2).sum(-1)) / tot)
    hi_ = np.minimum(1.0, p + np.sqrt((d_hi ** 2).sum(-1)) / tot)
    return p, lo_, hi_, np.where(none, 0.0, V).sum(-1) / tot ** 2


class History(NamedTuple):
    """One sub-stratum (or a domain cell of one): ``N`` faults, ``n0`` audited (``k0``
    critical), then rounds ``rounds`` (ascending numbers >= 1) that drew ``n`` faults with
    ``k`` critical. ``fill``: point value of the rate when nothing was drawn after the audit
    (None: the rate seen); ``prior``: the class prior (:func:`share`)."""

    N: int
    n0: int = 0
    k0: float = 0
    rounds: tuple[int, ...] = ()
    n: tuple[int, ...] = ()
    k: tuple[float, ...] = ()
    fill: float | None = None
    prior: float = 0.0


def as_arrays(hists: Sequence[History]) -> tuple[np.ndarray, ...]:
    """``(N, n, k, prior, fill)`` of histories (rounds by number, column 0 the audit)."""
    T = 1 + max((max(h.rounds) for h in hists if h.rounds), default=0)
    n, k = np.zeros((len(hists), T)), np.zeros((len(hists), T))
    for i, h in enumerate(hists):
        n[i, 0], k[i, 0] = h.n0, h.k0
        for r, a, b in zip(h.rounds, h.n, h.k, strict=True):
            n[i, r], k[i, r] = n[i, r] + a, k[i, r] + b
    seen = n.sum(-1)
    fill = np.array([h.fill if h.fill is not None else (k[i].sum() / seen[i] if seen[i] else 0.5)
                     for i, h in enumerate(hists)])
    return (np.array([h.N for h in hists], dtype=np.float64), n, k,
            np.array([h.prior for h in hists], dtype=np.float64), fill)


def round_weights(h: History, topup: float | None = None) -> list[float]:
    """Weights (:func:`weights`) of the rounds of ``h`` that drew faults, in order."""
    N, n, k, prior, _ = as_arrays([h])
    w = weights(N, n, k, prior, topup)[0]
    return [float(w[r]) for r, m in zip(h.rounds, h.n, strict=True) if m > 0]


class SeqEstimate(NamedTuple):
    """Point ``p``, MOVER interval ``ci``, ``margin``, variance estimate ``var``, sizes."""

    p: float
    ci: tuple[float, float]
    margin: float
    var: float
    n: int
    k: int
    N: int


def sequential_estimate(hists: Sequence[History], confidence: float,
                        method: str = "clopper-pearson") -> SeqEstimate:
    """CFR of the union of the sub-strata ``hists`` (weights ``W_h = N_h / N``): the
    estimator, interval and variance estimate of the module docstring."""
    hists = [h for h in hists if h.N > 0]
    if not hists:
        return SeqEstimate(math.nan, (0.0, 1.0), math.nan, math.nan, 0, 0, 0)
    N, n, k, prior, fill = as_arrays(hists)
    p, lo, hi, var = (float(v) for v in estimate_arrays(N, n, k, prior, confidence, method,
                                                          fill))
    return SeqEstimate(p, (lo, hi), max(hi - p, p - lo), var, int(n.sum()),
                       int(round(k.sum())), int(N.sum()))
