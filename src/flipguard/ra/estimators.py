"""Estimators of the Resiliency Accuracy ``RA = sum_s P(s) * Acc(s)``.

Both estimators work on the accuracy *drop* ``d(s) = golden - Acc(s)`` (zero for masked
faults; negative when a fault happens to improve the accuracy), so that variance reduction
acts on the rare critical part: ``RA = golden - E_P[d]``. Plain Monte Carlo draws sites from
``P`` (weights 1); importance sampling draws from a proposal ``q`` (normally the defensive
mixture ``alpha * P + (1 - alpha) * h``, so weights ``P/q <= 1/alpha``) and uses the unbiased
(not self-normalised) estimator ``mean(w * d)`` with ``w = P(s)/q(s)``.

The interval is a confidence *sequence* (:mod:`flipguard.ra.confseq`, default
``betting-cs``): valid at every sample count at once, hence under the sequential stopping
rule and at any fixed ``n``. It needs only that every term ``w * d`` lies in
``[B (golden - 1), B golden]`` with a weight bound ``B`` known before the batch is drawn (1
for MC, ``weight_bound`` or the proposal's own bound for IS). Sampling runs in batches and
stops when the half-width reaches ``target_margin`` (after ``min_samples``) or at
``max_samples``. Batch ``b`` is drawn from ``default_rng([seed, b])``, so a resumed run
redraws the same sites. An adaptive proposal (``AdaptiveMixture``) is re-fitted after every
batch from the batches before it; each batch is weighted by the proposal that drew it, so
every term has conditional mean ``E_P[d]`` given the past (a martingale), which is all the
confidence sequence needs. ``ess`` is the MC-equivalent sample size ``n * V_MC / V_IS`` (the
number of plain MC samples with the same variance; ``n`` for MC).

>>> est = summarise(np.array([0.0, 0.5, 0.0, 0.0]), np.ones(4), golden=0.9)
>>> round(est.ra, 3), est.samples, est.interval
(0.775, 4, 'betting-cs')
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from flipguard.errors import ConfigError
from flipguard.ra.confseq import INTERVALS, make_cs
from flipguard.ra.distribution import Distribution, Mixture, SiteDistribution, Sites

__all__ = ["Estimate", "summarise", "estimate_ra", "reweight", "exhaustive", "Evaluate",
           "EngineEvaluator", "weight_bound_of"]

Evaluate = Callable[[Sites], np.ndarray]
"""Accuracy of the model with each site's fault (one value per site)."""


@dataclass
class Estimate:
    """An RA estimate with its interval (``ci`` for RA, ``drop_ci`` for the drop);
    ``interval`` names the method (``betting-cs`` | ``eb-cs`` | ``clt``)."""

    ra: float
    ci: tuple[float, float]
    accuracy_drop: float
    drop_ci: tuple[float, float]
    golden_accuracy: float
    samples: int
    ess: float
    half_width: float
    confidence: float
    estimator: str = "mc"
    stopped: str = ""
    max_weight: float = 1.0
    interval: str = "betting-cs"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"], d["drop_ci"] = list(self.ci), list(self.drop_ci)
        return d


class _Running:
    """Terms of an estimation so far: sums for the point estimate and ESS, and the
    confidence sequence (or, for ``clt``, the terms themselves)."""

    def __init__(self, golden: float, confidence: float, interval: str, margin: float,
                 horizon: int | None, bound_max: float) -> None:
        if interval not in INTERVALS:
            raise ConfigError(f"--interval: expected one of {', '.join(INTERVALS)}, got "
                              f"{interval!r}")
        if not 0 < confidence < 1:
            raise ConfigError(f"--confidence: expected a value in (0, 1), got {confidence}")
        self.golden, self.confidence, self.interval = float(golden), confidence, interval
        self.cs = None if interval == "clt" else make_cs(
            interval, confidence, golden - 1.0, golden, margin=margin, horizon=horizon,
            term_lo=bound_max * (golden - 1.0), term_hi=bound_max * golden, prior_mean=0.0)
        self.clt_bound = bound_max
        self.n, self.st, self.st2, self.swd2, self.wmax = 0, 0.0, 0.0, 0.0, 0.0
        self.terms: list[np.ndarray] = []

    def add(self, d: np.ndarray, w: np.ndarray, bound: np.ndarray | float) -> None:
        t = w * d
        self.n += int(t.size)
        self.st += float(t.sum())
        self.st2 += float((t * t).sum())
        self.swd2 += float((w * d * d).sum())
        self.wmax = max(self.wmax, float(w.max(initial=0.0)))
        if self.cs is None:
            self.terms.append(t)
            return
        b = np.asarray(bound, dtype=np.float64)
        if (w > b * (1 + 1e-9)).any():
            raise ConfigError(f"weight_bound: a sampled weight P/q = {float(w.max()):.6g} "
                              f"exceeds the stated bound {float(b.max()):.6g}")
        self.cs.update(t, b * (self.golden - 1.0), b * self.golden)

    def estimate(self, estimator: str, stopped: str = "") -> Estimate:
        n, g = self.n, self.golden
        if n == 0:
            return Estimate(math.nan, (0.0, 1.0), math.nan, (g - 1.0, g), g, 0, 0.0,
                            math.inf, self.confidence, estimator, stopped, 1.0, self.interval)
        mean = self.st / n
        v_is = max(self.st2 / n - mean * mean, 0.0)
        v_mc = max(self.swd2 / n - mean * mean, 0.0)
        ess = float(n) if v_is <= 1e-15 * max(self.st2 / n, 1e-300) else n * v_mc / v_is
        if estimator == "mc":
            ess = float(n)
        if self.cs is None:
            lo, hi = _clt(np.concatenate(self.terms), self.confidence, self.clt_bound)
        else:
            lo, hi = self.cs.interval()
        ci = (max(0.0, g - hi), min(1.0, g - lo))
        return Estimate(g - mean, ci, mean, (lo, hi), g, n, ess, 0.5 * (hi - lo),
                        self.confidence, estimator, stopped, self.wmax, self.interval)


def _clt(t: np.ndarray, confidence: float, bound: float) -> tuple[float, float]:
    """The normal interval ``mean +- z sd / sqrt(n)`` (``-ln(1 - confidence) * bound / n``
    while every term is equal). Not valid under sequential stopping (comparison only)."""
    n, mean = t.size, float(t.mean())
    sd = float(t.std(ddof=1)) if n > 1 else math.inf
    hw = float(norm.ppf(0.5 + confidence / 2)) * sd / math.sqrt(n)
    if sd == 0.0:
        hw = -math.log(1 - confidence) * bound / n
    return mean - hw, mean + hw


def summarise(drops: np.ndarray, weights: np.ndarray, golden: float, confidence: float = 0.95,
              bound: float | np.ndarray = 1.0, estimator: str = "mc", stopped: str = "",
              interval: str = "betting-cs", margin: float = 0.0,
              horizon: int | None = None) -> Estimate:
    """Estimate from per-sample drops ``d`` and weights ``w``, in draw order: ``mean(w * d)``
    and the interval ``interval`` at level ``confidence``.

    ``bound`` bounds the weights (a scalar, or one value per sample known before it was
    drawn): every term lies in ``[bound (golden - 1), bound golden]``. ``margin`` and
    ``horizon`` only tune the bets of the confidence sequence (None: time-uniform tuning).
    For ``clt``, ``bound`` bounds ``|w * d|`` for the zero-variance guard.
    """
    d, w = np.asarray(drops, float), np.asarray(weights, float)
    b = np.asarray(bound, dtype=np.float64)
    run = _Running(golden, confidence, interval, margin, horizon,
                   float(b.max()) if b.size else 1.0)
    if d.size:
        run.add(d, w, b)
    return run.estimate(estimator, stopped)


def _check(target_margin: float, max_samples: int, min_samples: int, batch: int) -> None:
    if not target_margin >= 0:
        raise ConfigError(f"--target-margin: expected a non-negative number, got {target_margin}")
    for name, v in (("--max-samples", max_samples), ("--batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
    if not isinstance(min_samples, int) or min_samples < 2:
        raise ConfigError(f"--min-samples: expected an integer >= 2, got {min_samples!r}")


def weight_bound_of(p: Distribution, q: Distribution) -> float | None:
    """A bound on ``P/q`` that holds for every batch, if ``q`` states one: an adaptive
    proposal's ``1/alpha``, or ``1/weight`` of the part of a :class:`Mixture` that is ``p``
    (the defensive mixture); None otherwise.

    >>> from flipguard.ra.proposal import defensive
    >>> weight_bound_of(p, defensive(p, h, 0.25))  # doctest: +SKIP
    4.0
    """
    alpha = getattr(q, "alpha", None)
    if callable(getattr(q, "weight_bound", None)) and alpha:
        return 1.0 / float(alpha)
    if isinstance(q, Mixture):
        share = sum(float(wt) for part, wt in zip(q.parts, q.weights, strict=True)
                    if part is p)
        if share > 0:
            return 1.0 / share
    return None


def estimate_ra(p: Distribution, evaluate: Evaluate, golden_accuracy: float, *,
                q: Distribution | None = None, target_margin: float = 0.01,
                confidence: float = 0.95, max_samples: int = 10_000, min_samples: int = 100,
                batch: int = 100, seed: int = 0, weight_bound: float | None = None,
                record: Callable[[int, Sites, np.ndarray, np.ndarray, np.ndarray], None]
                | None = None,
                progress: Callable[[Estimate], None] | None = None,
                interval: str = "betting-cs") -> Estimate:
    """Sequential MC (``q`` None) or importance-sampling estimate of RA under ``p``.

    ``record(first_seq, sites, q, p, acc)`` is called once per batch (e.g. a store);
    ``weight_bound`` bounds ``P/q`` (``1/alpha`` for a defensive mixture; found by
    :func:`weight_bound_of` when None; a proposal with a ``weight_bound()`` method, e.g.
    :class:`~flipguard.ra.adaptive.AdaptiveMixture`, may state a tighter bound before each
    batch). An adaptive ``q`` (with ``reset()`` and ``update(sites, drops)``) is reset first
    and updated after every batch; each batch is drawn from (and weighted by) the proposal
    fitted on earlier batches. ``interval``: ``betting-cs`` (default), ``eb-cs`` or ``clt``
    (normal approximation, *not* valid under the stopping rule; for comparison).

    >>> est = estimate_ra(p, evaluate, 0.95, target_margin=0.005)  # doctest: +SKIP
    """
    _check(target_margin, max_samples, min_samples, batch)
    mc = q is None
    prop = p if q is None else q
    adaptive = callable(getattr(q, "update", None))
    if adaptive:
        q.reset()  # type: ignore[union-attr]
    bound = 1.0 if mc else weight_bound if weight_bound is not None else \
        weight_bound_of(p, prop)
    if bound is None and interval != "clt":
        raise ConfigError("weight_bound: a bound on P/q is needed for a valid interval with "
                          "this proposal (1/alpha for a defensive mixture)")
    per_batch = getattr(q, "weight_bound", None) if not mc else None
    run = _Running(golden_accuracy, confidence, interval, target_margin, max_samples,
                   float(bound) if bound is not None else 1.0)
    n, b, est = 0, 0, None
    while n < max_samples:
        k = min(batch, max_samples - n)
        b_now = float(bound) if bound is not None else math.inf
        if callable(per_batch):
            b_now = min(b_now, float(per_batch()))
        rng = np.random.default_rng([int(seed), b])
        sites = prop.sample(rng, batch)
        if k < batch:
            sites = sites.take(np.arange(k))
        pp = p.prob(sites)
        qq = pp if mc else prop.prob(sites)
        if (qq <= 0).any():
            raise ConfigError("proposal: a sampled site has zero proposal probability")
        acc = np.asarray(evaluate(sites), dtype=float)
        if acc.shape != (k,) or not np.isfinite(acc).all():
            raise ConfigError("evaluate: expected one finite accuracy per site")
        if record is not None:
            record(n, sites, qq, pp, acc)
        drops, w = golden_accuracy - acc, pp / qq
        if bound is None:  # clt without a stated bound: the old observed-maximum guard
            run.clt_bound = max(run.clt_bound if n else 0.0, float(w.max()))
        run.add(drops, w, b_now)
        if adaptive:
            q.update(sites, drops)  # type: ignore[union-attr]
        n, b = n + k, b + 1
        est = run.estimate("mc" if mc else "is")
        if progress is not None:
            progress(est)
        if n >= min_samples and est.half_width <= target_margin:
            est.stopped = "target-margin"
            return est
    assert est is not None
    est.stopped = "max-samples"
    return est


def reweight(sites: Sites, q: np.ndarray, acc: np.ndarray, p_new: Distribution,
             golden_accuracy: float, confidence: float = 0.95, estimator: str = "is",
             bound: float | None = None, interval: str = "betting-cs") -> Estimate:
    """Estimate RA under ``p_new`` from samples drawn (in this order) from a proposal with
    probabilities ``q`` (their accuracies ``acc``), with weights ``p_new(s) / q(s)``: no new
    injection. Valid when the proposal covers every site ``p_new`` can produce; ``bound``
    must bound ``p_new / q`` over every site the proposal could have drawn (e.g.
    ``max_ratio(p_new, p_old) / alpha`` for a defensive mixture over ``p_old``,
    :func:`flipguard.ra.weights.max_ratio`). The bets are tuned time-uniformly (the sample
    count was chosen by another stopping rule).

    >>> p_new = build_exposure(net, x, "systolic")  # doctest: +SKIP
    >>> est = reweight(sites, q, acc, p_new, 0.9, bound=5.0)  # doctest: +SKIP
    """
    q = np.asarray(q, float)
    if (q <= 0).any():
        raise ConfigError("reweight: stored proposal probabilities must be positive")
    w = p_new.prob(sites) / q
    if bound is None:
        if interval != "clt":
            raise ConfigError("reweight: a bound on p_new/q is needed for a valid interval")
        bound = float(w.max(initial=1.0))
    d = golden_accuracy - np.asarray(acc, float)
    return summarise(d, w, golden_accuracy, confidence, float(bound), estimator, "reweighted",
                     interval)


def exhaustive(p: SiteDistribution, evaluate: Evaluate, golden_accuracy: float,
               limit: int = 200_000) -> tuple[float, Sites, np.ndarray, np.ndarray]:
    """Exact ``(RA, sites, P, Acc)`` by evaluating every site (tiny models only).

    >>> ra, sites, prob, acc = exhaustive(p, evaluate, 0.9)  # doctest: +SKIP
    """
    sites, prob = p.enumerate(limit)
    acc = np.asarray(evaluate(sites), float)
    return float(golden_accuracy - np.sum(prob * (golden_accuracy - acc))), sites, prob, acc


class EngineEvaluator:
    """Accuracy of each site's single-bit flip via a :class:`flipguard.inject.Engine`
    (image-level detection accuracy at the deployed threshold, or top-1 accuracy).

    >>> evaluate = EngineEvaluator(Engine(model, x, ClassificationTask(y)))  # doctest: +SKIP
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.golden_accuracy = float(engine.golden.accuracy)

    def __call__(self, sites: Sites) -> np.ndarray:
        outs = self.engine.run(sites.faults())
        return np.array([self.golden_accuracy if o.accuracy is None else float(o.accuracy)
                         for o in outs], dtype=float)
