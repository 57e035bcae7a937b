"""Estimators of the Resiliency Accuracy ``RA = sum_s P(s) * Acc(s)``.

Both estimators work on the accuracy *drop* ``d(s) = golden - Acc(s)``, which is zero for
masked faults, so that variance reduction acts on the rare critical part:
``RA = golden - E_P[d]``. Plain Monte Carlo draws sites from ``P`` (weights 1); importance
sampling draws from a proposal ``q`` (normally the defensive mixture ``alpha * P +
(1 - alpha) * h``, so weights ``P/q <= 1/alpha``) and uses the unbiased (not self-normalised)
estimator ``mean(w * d)`` with ``w = P(s)/q(s)``. The interval is the CLT interval of the
weighted terms; ESS = (sum w)^2 / sum w^2. Sampling runs in batches and stops when the
half-width reaches ``target_margin`` (after ``min_samples``) or at ``max_samples``. Batch
``b`` is drawn from ``default_rng([seed, b])``, so a resumed run redraws the same sites.
An adaptive proposal (``AdaptiveMixture``) is re-fitted after every batch from the batches
before it; each batch is weighted by the proposal that drew it, which keeps ``mean(w * d)``
unbiased (a martingale).

>>> est = summarise(np.array([0.0, 0.5, 0.0, 0.0]), np.ones(4), golden=0.9)
>>> round(est.ra, 3), est.samples
(0.775, 4)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from flipguard.errors import ConfigError
from flipguard.ra.distribution import Distribution, SiteDistribution, Sites

__all__ = ["Estimate", "summarise", "estimate_ra", "reweight", "exhaustive", "Evaluate"]

Evaluate = Callable[[Sites], np.ndarray]
"""Accuracy of the model with each site's fault (one value per site)."""


@dataclass
class Estimate:
    """An RA estimate with its interval (``ci`` for RA, ``drop_ci`` for the drop)."""

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"], d["drop_ci"] = list(self.ci), list(self.drop_ci)
        return d


def summarise(drops: np.ndarray, weights: np.ndarray, golden: float, confidence: float = 0.95,
              bound: float = 1.0, estimator: str = "mc", stopped: str = "") -> Estimate:
    """Estimate from per-sample drops ``d`` and weights ``w`` (``mean(w * d)``, CLT interval).

    ``bound`` bounds ``|w * d|``; when every term is equal (no critical fault seen yet) the
    half-width is at least ``-ln(1 - confidence) * bound / n`` instead of 0.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence: expected a value in (0, 1), got {confidence}")
    d, w = np.asarray(drops, float), np.asarray(weights, float)
    n = int(d.size)
    if n == 0:
        return Estimate(math.nan, (0.0, 1.0), math.nan, (math.nan, math.nan), golden, 0, 0.0,
                        math.inf, confidence, estimator, stopped)
    t = w * d
    mean = float(t.mean())
    sd = float(t.std(ddof=1)) if n > 1 else math.inf
    hw = float(norm.ppf(0.5 + confidence / 2)) * sd / math.sqrt(n)
    if sd == 0.0:
        hw = -math.log(1 - confidence) * bound / n
    ess = float(w.sum() ** 2 / (w ** 2).sum()) if (w ** 2).sum() > 0 else 0.0
    lo, hi = mean - hw, mean + hw
    ci = (max(0.0, golden - hi), min(1.0, golden - lo))
    return Estimate(golden - mean, ci, mean, (lo, hi), golden, n, ess, hw, confidence,
                    estimator, stopped, float(w.max()))


def _check(target_margin: float, max_samples: int, min_samples: int, batch: int) -> None:
    if not target_margin >= 0:
        raise ConfigError(f"--target-margin: expected a non-negative number, got {target_margin}")
    for name, v in (("--max-samples", max_samples), ("--batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
    if not isinstance(min_samples, int) or min_samples < 2:
        raise ConfigError(f"--min-samples: expected an integer >= 2, got {min_samples!r}")


def estimate_ra(p: Distribution, evaluate: Evaluate, golden_accuracy: float, *,
                q: Distribution | None = None, target_margin: float = 0.01,
                confidence: float = 0.95, max_samples: int = 10_000, min_samples: int = 100,
                batch: int = 100, seed: int = 0, weight_bound: float | None = None,
                record: Callable[[int, Sites, np.ndarray, np.ndarray, np.ndarray], None]
                | None = None,
                progress: Callable[[Estimate], None] | None = None) -> Estimate:
    """Sequential MC (``q`` None) or importance-sampling estimate of RA under ``p``.

    ``record(first_seq, sites, q, p, acc)`` is called once per batch (e.g. a store);
    ``weight_bound`` bounds ``P/q`` (``1/alpha`` for a defensive mixture). An adaptive ``q``
    (with ``reset()`` and ``update(sites, drops)``, e.g.
    :class:`~flipguard.ra.adaptive.AdaptiveMixture`) is reset first and updated after every
    batch; each batch is drawn from (and weighted by) the proposal fitted on earlier batches.

    >>> est = estimate_ra(p, evaluate, 0.95, target_margin=0.005)  # doctest: +SKIP
    """
    _check(target_margin, max_samples, min_samples, batch)
    mc = q is None
    prop = p if q is None else q
    adaptive = callable(getattr(q, "update", None))
    if adaptive:
        q.reset()  # type: ignore[union-attr]
    bound = 1.0 if mc else float(weight_bound if weight_bound is not None else np.inf)
    drops: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    n, b, est = 0, 0, None
    while n < max_samples:
        k = min(batch, max_samples - n)
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
        drops.append(golden_accuracy - acc)
        weights.append(pp / qq)
        if adaptive:
            q.update(sites, drops[-1])  # type: ignore[union-attr]
        n, b = n + k, b + 1
        w_all = np.concatenate(weights)
        est = summarise(np.concatenate(drops), w_all, golden_accuracy, confidence,
                        bound if np.isfinite(bound) else float(w_all.max()),
                        "mc" if mc else "is")
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
             bound: float | None = None) -> Estimate:
    """Estimate RA under ``p_new`` from samples drawn from a proposal with probabilities
    ``q`` (their accuracies ``acc``), with weights ``p_new(s) / q(s)``: no new injection.
    Valid (unbiased) when the proposal covers every site ``p_new`` can produce.

    >>> est = reweight(sites, q, acc, build_exposure(net, x, "systolic"), 0.9)  # doctest: +SKIP
    """
    q = np.asarray(q, float)
    if (q <= 0).any():
        raise ConfigError("reweight: stored proposal probabilities must be positive")
    w = p_new.prob(sites) / q
    d = golden_accuracy - np.asarray(acc, float)
    return summarise(d, w, golden_accuracy, confidence,
                     float(bound) if bound is not None else float(w.max(initial=1.0)),
                     estimator, "reweighted")


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


@dataclass
class RAConfig:
    """Settings of one RA estimation (see ``flipguard ra --help``)."""

    hardware: str = "uniform"
    estimator: str = "mc"
    proposal: str = "adaptive"
    alpha: float = 0.2
    pilot: int = 2
    target_margin: float = 0.01
    confidence: float = 0.95
    max_samples: int = 5000
    min_samples: int = 100
    batch: int = 64
    seed: int = 0
    targets: tuple[str, ...] = ("weight", "activation")
    fmt: str = "fp32"
    layers: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Raise a one-line ConfigError for a bad setting (before any work is done)."""
        from flipguard.ra.exposure import RA_TARGETS, parse_hardware
        from flipguard.ra.proposal import PROPOSALS

        if self.estimator not in ("mc", "is"):
            raise ConfigError(f"--estimator: expected 'mc' or 'is', got {self.estimator!r}")
        bad = [t for t in self.targets if t not in RA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--targets: expected items of {', '.join(RA_TARGETS)}, got "
                              f"{bad[0] if bad else 'nothing'!r}")
        if self.estimator == "is" and self.proposal not in PROPOSALS:
            raise ConfigError(f"--proposal: expected one of {', '.join(PROPOSALS)}, got "
                              f"{self.proposal!r}")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"--alpha: expected a value in (0, 1], got {self.alpha}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence: expected a value in (0, 1), got {self.confidence}")
        _check(self.target_margin, self.max_samples, self.min_samples, self.batch)
        parse_hardware(self.hardware)

    def stream_info(self, hardware_config: dict[str, Any], proposal: dict[str, Any] | None
                    ) -> dict[str, Any]:
        """What identifies a resumable sample stream (not the stopping rule)."""
        return {"hardware": self.hardware, "hardware_config": hardware_config,
                "estimator": self.estimator, "proposal": proposal,
                "alpha": self.alpha if self.estimator == "is" else None, "seed": self.seed,
                "batch": self.batch, "targets": list(self.targets), "format": self.fmt,
                "layers": None if self.layers is None else list(self.layers)}


def stream_key(info: dict[str, Any]) -> str:
    """Stable short key of a stream's settings."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def resiliency_accuracy(engine: Any, cfg: RAConfig, store: Any | None = None,
                        progress: Callable[[Estimate], None] | None = None) -> dict[str, Any]:
    """Estimate RA of the engine's model/data/task under ``cfg`` (samples go to ``store``,
    an :class:`~flipguard.ra.store.RAStore`, so a later call resumes). Returns the result
    dict documented in docs/resiliency-accuracy.md.

    >>> cfg = RAConfig(hardware="systolic", estimator="is")
    >>> res = resiliency_accuracy(engine, cfg, RAStore(run / "ra.sqlite"))  # doctest: +SKIP
    """
    from flipguard.ra.exposure import build_exposure, parse_hardware
    from flipguard.ra.proposal import ProposalContext, defensive, make_proposal
    from flipguard.ra.store import CachedEvaluator

    cfg.validate()
    hw = parse_hardware(cfg.hardware)
    p = build_exposure(engine.model, engine.inputs[:1], hw, cfg.targets, cfg.fmt, cfg.layers)
    base = EngineEvaluator(engine)
    evaluate = CachedEvaluator(base, store) if store is not None else base
    golden = base.golden_accuracy
    q, prop_cfg, ctx_info = None, None, {}
    if cfg.estimator == "is":
        kwargs = {"n": cfg.pilot} if cfg.proposal == "pilot" else {}
        prop = make_proposal(cfg.proposal, **kwargs)
        ctx = ProposalContext(engine.model, engine.inputs, engine.task.labels,
                              engine.task.kind, evaluate, golden, cfg.fmt, cfg.seed)
        mixture = getattr(prop, "mixture", None)
        q = (mixture(p, ctx, cfg.alpha) if callable(mixture)
             else defensive(p, prop.heuristic(p, ctx), cfg.alpha))
        prop_cfg, ctx_info = prop.config(), ctx.info
    info = cfg.stream_info(hw.config(), prop_cfg)
    key = stream_key(info)
    record = None
    if store is not None:
        store.open_stream(key, info)
        record = store.recorder(key)
    est = estimate_ra(p, evaluate, golden, q=q, target_margin=cfg.target_margin,
                      confidence=cfg.confidence, max_samples=cfg.max_samples,
                      min_samples=cfg.min_samples, batch=cfg.batch, seed=cfg.seed,
                      weight_bound=None if q is None else 1.0 / cfg.alpha, record=record,
                      progress=progress)
    summary = getattr(q, "summary", None)
    if callable(summary):
        ctx_info = {**ctx_info, "adaptive": summary()}
    return result_dict(est, cfg, p, info, key, getattr(evaluate, "injected", None),
                       engine, ctx_info)


def result_dict(est: Estimate, cfg: RAConfig, p: SiteDistribution, info: dict[str, Any],
                key: str, injected: int | None, engine: Any,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The documented JSON result of an estimate."""
    d = est.to_dict()
    out = {"ra": d["ra"], "ci": d["ci"], "confidence": cfg.confidence,
           "half_width": d["half_width"], "target_margin": cfg.target_margin,
           "accuracy_drop": d["accuracy_drop"], "accuracy_drop_ci": d["drop_ci"],
           "golden_accuracy": d["golden_accuracy"], "samples": d["samples"],
           "injections": injected, "ess": d["ess"], "max_weight": d["max_weight"],
           "estimator": d["estimator"], "stopped": d["stopped"],
           "proposal": info.get("proposal"), "alpha": info.get("alpha"),
           "hardware": cfg.hardware, "hardware_config": info.get("hardware_config"),
           "cycles": p.info.get("cycles"), "exposure_share": p.shares(),
           "exposure_by_layer": p.layer_shares(), "targets": list(cfg.targets),
           "format": cfg.fmt, "seed": cfg.seed, "stream": key,
           "task": getattr(engine.task, "kind", None), "n_images": int(engine.n)}
    if extra:
        out.update(extra)
    return out
