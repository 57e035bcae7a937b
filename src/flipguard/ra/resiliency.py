"""One RA estimation of an engine's model: settings (:class:`RAConfig`), the run
(:func:`resiliency_accuracy`), the re-weighting of stored samples to another exposure model
(:func:`reweighted_accuracy`) and the documented result dict (:func:`result_dict`).

>>> RAConfig(hardware="systolic", estimator="is").interval
'betting-cs'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flipguard.errors import ConfigError
from flipguard.ra.confseq import INTERVALS
from flipguard.ra.distribution import SiteDistribution
from flipguard.ra.estimators import EngineEvaluator, Estimate, _check, estimate_ra, reweight
from flipguard.ra.exposure import RA_TARGETS, build_exposure, parse_hardware
from flipguard.ra.proposal import PROPOSALS, ProposalContext, defensive, make_proposal
from flipguard.ra.store import CachedEvaluator
from flipguard.ra.weights import max_ratio

__all__ = ["RAConfig", "stream_key", "resiliency_accuracy", "result_dict",
           "reweighted_accuracy"]


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
    interval: str = "betting-cs"

    def validate(self) -> None:
        """Raise a one-line ConfigError for a bad setting (before any work is done).

        >>> RAConfig(min_samples=100, max_samples=10).validate()
        Traceback (most recent call last):
        flipguard.errors.ConfigError: --min-samples: 100 is more than --max-samples 10
        """
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
        if self.min_samples > self.max_samples:
            raise ConfigError(f"--min-samples: {self.min_samples} is more than --max-samples "
                              f"{self.max_samples}")
        if self.interval not in INTERVALS:
            raise ConfigError(f"--interval: expected one of {', '.join(INTERVALS)}, got "
                              f"{self.interval!r}")
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
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def resiliency_accuracy(engine: Any, cfg: RAConfig, store: Any | None = None,
                        progress: Callable[[Estimate], None] | None = None) -> dict[str, Any]:
    """Estimate RA of the engine's model/data/task under ``cfg`` (samples go to ``store``,
    an :class:`~flipguard.ra.store.RAStore`, so a later call resumes). Returns the result
    dict documented in docs/resiliency-accuracy.md.

    >>> cfg = RAConfig(hardware="systolic", estimator="is")
    >>> res = resiliency_accuracy(engine, cfg, RAStore(run / "ra.sqlite"))  # doctest: +SKIP
    """
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
                      progress=progress, interval=cfg.interval)
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
           "estimator": d["estimator"], "stopped": d["stopped"], "interval": d["interval"],
           "proposal": info.get("proposal"), "alpha": info.get("alpha"),
           "hardware": cfg.hardware, "hardware_config": info.get("hardware_config"),
           "cycles": p.info.get("cycles"), "exposure_share": p.shares(),
           "exposure_by_layer": p.layer_shares(), "targets": list(cfg.targets),
           "format": cfg.fmt, "seed": cfg.seed, "stream": key,
           "task": getattr(engine.task, "kind", None), "n_images": int(engine.n)}
    if extra:
        out.update(extra)
    return out


def reweighted_accuracy(engine: Any, cfg: RAConfig, store: Any, base_hw: str) -> dict[str, Any]:
    """RA under ``cfg.hardware`` from the samples ``store`` holds for exposure model
    ``base_hw`` (same targets, format and layers), re-weighted by ``P_new / q`` without
    injecting; refused when ``base_hw``'s exposure does not cover every site of the new one.
    Returns the :func:`result_dict` with ``reweighted_from``."""
    want = {"targets": list(cfg.targets), "format": cfg.fmt,
            "layers": None if cfg.layers is None else list(cfg.layers)}
    found = [s for s in store.streams() if s["info"].get("hardware") == base_hw and s["samples"]
             and all(s["info"].get(k) == v for k, v in want.items())]
    if not found:
        raise ConfigError(f"--reweight-from: no stored samples for hardware {base_hw!r} with "
                          f"these targets/format in {store.path}")
    src = max(found, key=lambda s: s["samples"])
    x = engine.inputs[:1]
    p_base = build_exposure(engine.model, x, base_hw, cfg.targets, cfg.fmt, cfg.layers)
    p_new = build_exposure(engine.model, x, cfg.hardware, cfg.targets, cfg.fmt, cfg.layers)
    if not p_base.covers(p_new):
        raise ConfigError(f"--reweight-from: samples drawn under {base_hw!r} do not cover every "
                          f"site that {cfg.hardware!r} can hit; estimate it directly")
    sites, q, _, acc = store.samples(src["stream"])
    golden = float(engine.golden.accuracy)
    # every proposal of the stream satisfies q >= alpha * P_base (MC: q = P_base), so
    # P_new / q <= sup(P_new / P_base) / alpha: the term bound of a valid interval
    share = src["info"].get("alpha") if src["info"]["estimator"] == "is" else 1.0
    bound = max_ratio(p_new, p_base) / float(share or 1.0)
    est = reweight(sites, q, acc, p_new, golden, cfg.confidence, src["info"]["estimator"],
                   bound, cfg.interval)
    info = {**src["info"], "hardware": cfg.hardware, "hardware_config": p_new.info["config"]}
    return result_dict(est, cfg, p_new, info, src["stream"], 0, engine,
                       {"reweighted_from": {"hardware": base_hw, "stream": src["stream"]}})
