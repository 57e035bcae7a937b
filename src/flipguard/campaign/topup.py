"""Planning the rounds after the allocation round: top-ups and the closing round.

The estimator (:mod:`flipguard.campaign.sequential`) is unbiased only if every round's
weight, and whether it is the last, are fixed before it is drawn. :func:`plan_round` therefore
decides, from the rounds so far, both the sizes of the next round and whether it closes: it
closes when its own part of the predicted squared margin is small (:data:`CLOSE_SHARE`), so
that its outcome can move the final margin little; otherwise it is a top-up (weight at most
``TOPUP`` of what is left) and a closing round follows.

>>> from flipguard.campaign.sequential import History
>>> h = [History(20000, 30, 0, (1,), (900,), (3,), prior=0.002),
...      History(2000, 30, 2, (1,), (200,), (9,), prior=0.02)]
>>> x, closes = plan_round(h, [0.0035, 0.048], 0.004, 0.95)
>>> x.tolist(), closes
([2123, 368], True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flipguard.campaign.sequential import History, _part, as_arrays, sums, weights

__all__ = ["CLOSE_SHARE", "SAFETY", "plan_round"]

CLOSE_SHARE = 0.4
"""Close once the new round's part of the predicted squared margin is at most this."""
SAFETY = ((0.97, 0.5), (0.97, 1.0))
"""``(fraction of the target margin, spread)`` that top-ups and closing rounds are planned
for, the new round's critical count ``spread sqrt(mean + 1)`` above its expectation ``mean``,
so that the closing round's own outcome rarely pushes the final margin above the target."""


def _margin(x: np.ndarray, base: dict, conf: float, method: str, spread: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted margin for candidate sizes ``x`` (rows: candidates, columns: sub-strata) of
    a round taking all the weight left, its critical count ``spread`` above its mean; and the
    round's share of the squared distances."""
    R, rate, c = base["R"], base["rate"], base["left"] * base["R"]
    on = x > 0
    f = np.where(R > 1, (R - x) / np.maximum(R - 1, 1), 0.0)
    sd = np.sqrt((rate * x + 1) * (1 - rate) * f) / np.maximum(x, 1)  # >= ~1 event
    C = base["C"] + np.where(on, c, 0.0)
    extra = np.where(on, c * spread * sd, 0.0)
    S = base["S"] + np.where(on, c * rate, 0.0) + extra
    D = base["D"] + np.where(on, c * c * f / np.maximum(x, 1), 0.0)
    q, lo, hi = _part(C, np.minimum(S, C), D, conf, method)
    q0, lo0, hi0 = _part(C, np.minimum(S, C), base["D"] + 0 * D, conf, method)
    N, p = base["N"], base["point"] / base["N"]
    dl, dh = (C * (q - lo)) ** 2, (C * (hi - q)) ** 2
    hi_ = np.minimum(1.0, p + np.sqrt(dh.sum(-1)) / N)
    lo_ = np.maximum(0.0, p - np.sqrt(dl.sum(-1)) / N)
    total = (dl + dh).sum(-1)
    old = ((C * (q0 - lo0)) ** 2 + (C * (hi0 - q0)) ** 2).sum(-1)
    share = np.divide(total - old, total, out=np.zeros_like(total), where=total > 0)
    return np.maximum(hi_ - p, p - lo_), share


def plan_round(hists: Sequence[History], rates: Sequence[float], error: float,
               confidence: float, method: str = "clopper-pearson", last: bool = False,
               close_share: float | None = None,
               safety: tuple[tuple[float, float], ...] | None = None
               ) -> tuple[np.ndarray, bool]:
    """Sizes of the next round (>= 1 for every sub-stratum with faults left) and whether it
    closes. Sizes grow greedily, ~10 % at a time, where they shrink the margin predicted at
    ``rates`` (as if this round took all the weight left) most per fault, until it is at most
    the planned fraction of ``error`` (:data:`SAFETY`; halfway between what the earlier
    rounds leave and ``error`` when that is more, 1.1x what they leave when even that is
    above ``error``). The round closes when ``last`` or when its part of the predicted
    squared margin is at most ``close_share`` (:data:`CLOSE_SHARE`); otherwise it is a top-up
    and a closing round follows."""
    close_share = CLOSE_SHARE if close_share is None else close_share
    safety = SAFETY if safety is None else safety
    N, n, k, prior, _ = as_arrays(hists)
    w = weights(N, n, k, prior, closed=False)  # the rounds so far, none of them the last
    const, C, S, D, _ = sums(N, n, k, w)
    drawn = n.sum(-1)
    R = N - drawn
    rate = np.clip(np.asarray(rates, dtype=np.float64)[: len(hists)], 0.0, 1.0)
    left = 1.0 - w.sum(-1)
    base = {"R": R, "rate": rate, "left": left, "N": float(N.sum()), "C": C, "S": S, "D": D,
            "point": float((const + S + left * R * rate).sum())}
    floor = float(_margin(R[None], base, confidence, method, 0.0)[0][0])

    def grow(target: float, spread: float) -> tuple[np.ndarray, float, float]:
        x = np.minimum(R, 1.0)
        target = max(target, (floor + error) / 2 if floor < error else 1.1 * floor)
        cur = float(_margin(x[None], base, confidence, method, spread)[0][0])
        while cur > target:
            step = np.minimum(R - x, np.maximum(1.0, np.ceil(np.maximum(0.1 * x, 0.02 * drawn))))
            cand = np.flatnonzero(step > 0)
            if not cand.size:
                break
            trials = np.repeat(x[None], len(cand), 0)
            trials[np.arange(len(cand)), cand] += step[cand]
            m = _margin(trials, base, confidence, method, spread)[0]
            best = int(np.argmax((cur - m) / step[cand]))
            x, cur = trials[best], float(m[best])
        m, sh = _margin(x[None], base, confidence, method, spread)
        return x, float(m[0]), float(sh[0])

    x, m, sh = grow(safety[1][0] * error, safety[1][1])
    if last or m <= 0 or sh <= close_share:
        return x.astype(np.int64), True
    return grow(safety[0][0] * error, safety[0][1])[0].astype(np.int64), False
