"""Importance-sampling proposals: cheap heuristics ``h`` of where critical faults are.

A :class:`Proposal` turns the exposure distribution ``P`` into a heuristic distribution
``h`` over the same blocks (per-stratum weights and, optionally, per-site weights);
:func:`defensive` mixes it as ``q = alpha * P + (1 - alpha) * h`` so that ``P/q <= 1/alpha``.
Built in (registry :data:`PROPOSALS`, extend with :func:`register_proposal`):

* ``bitfield`` - ``h ~ P x beta(bit)``, ``beta`` = log2 of the relative value change of a
  flip of that bit (FP exponent bit j: 2^j; mantissa bit b: log2(1 + 2^(b - mantissa bits));
  sign: log2 3; INT8 bit b: 2^b/128);
* ``adaptive`` (the default of ``flipguard ra``) - no pilot: starts from ``criticality``
  and, after every batch of the estimation itself, re-sets the mass of every (tensor, bit)
  cell to ``P_c x sqrt(m_c)`` (the variance-optimal masses for a fixed shape inside the
  cells; ``sqrt(m_c)`` is the cell's root-mean-square drop when the shape is ``P``'s),
  ``m_c`` estimated from every sample so far with hierarchical shrinkage (cell ->
  (target, bit) -> (target, bit group) -> bit group -> ``E_P[d^2]``)
  (:mod:`flipguard.ra.adaptive`);
* ``pilot`` - a short pilot of ``n`` faults per (tensor, bit group) stratum drawn from ``P``
  measures the mean |accuracy drop| of each stratum; ``h`` gives each stratum ``P``-mass x
  (that mean + a floor), bits inside a group by ``beta``;
* ``gradient`` - ``h ~ P x (s/mean s + 0.1)^0.5 x beta(bit)`` with first-order
  sensitivities ``s = |value x d loss / d value|`` (cross-entropy for classifiers,
  reconstruction MSE for detectors), per element for tensors up to ``DENSE_CAP`` elements;
* ``criticality`` - ``h ~ P x`` the criticality predictor's per-site probability of a
  critical flip (:class:`CriticalityProposal`, shared with stratified campaigns).

>>> q = defensive(p, BitFieldProposal().heuristic(p, ProposalContext()), 0.2)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipguard.criticality import CLASS_PRIORS, Predictor, classes_of_rho
from flipguard.errors import ConfigError
from flipguard.faults import FloatFormat, NumberFormat, get_format
from flipguard.inject import ClassificationTask
from flipguard.layers import eval_mode, forward_hooks
from flipguard.ra.distribution import (
    Block,
    Mixture,
    SiteDistribution,
    Sites,
    Term,
)

__all__ = ["ProposalContext", "Proposal", "BitFieldProposal", "PilotProposal",
           "GradientProposal", "SiteWeightProposal", "CriticalityProposal", "PROPOSALS",
           "register_proposal", "make_proposal", "defensive", "bit_sensitivity"]

DENSE_CAP = 1 << 22


@dataclass
class ProposalContext:
    """What a heuristic may use: the model, a few inputs/labels, the task kind, an
    evaluator for pilots (``evaluate(sites) -> accuracies``), the golden accuracy, format
    and seed."""

    model: nn.Module | None = None
    inputs: Tensor | None = None
    labels: np.ndarray | None = None
    task: str = "classification"
    evaluate: Callable[[Sites], np.ndarray] | None = None
    golden_accuracy: float | None = None
    fmt: str = "fp32"
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class Proposal:
    """Interface: ``heuristic(p, ctx) -> SiteDistribution`` over ``p``'s blocks."""

    name = ""

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        raise NotImplementedError  # pragma: no cover

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


def bit_sensitivity(fmt: str | NumberFormat) -> np.ndarray:
    """``beta(bit)``: log2 of the relative value change of flipping each bit (LSB first).

    >>> int(bit_sensitivity("fp32")[30])
    128
    """
    f = get_format(fmt)
    out = np.zeros(f.bits)
    if isinstance(f, FloatFormat):
        m = f.man_bits
        out[:m] = np.log2(1 + 2.0 ** (np.arange(m) - m))
        out[m:f.bits - 1] = 2.0 ** np.arange(f.exp_bits)
        out[f.bits - 1] = np.log2(3)
    else:
        out[:] = 2.0 ** np.arange(f.bits) / 128.0
        out[f.bits - 1] = 1.0
    return out


def _with_bits(p: SiteDistribution, bit_weights: dict[tuple[str, str], np.ndarray],
               name: str) -> SiteDistribution:
    return SiteDistribution([Block(b.target, b.layer, b.shape, bit_weights[b.key], b.terms)
                             for b in p.blocks], name=name)


class BitFieldProposal(Proposal):
    """``h ~ P x beta(bit)`` (data-free)."""

    name = "bitfield"

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        beta = bit_sensitivity(ctx.fmt)
        return _with_bits(p, {b.key: b.bit_weights * beta for b in p.blocks}, self.name)


def bit_groups(fmt: str | NumberFormat) -> list[np.ndarray]:
    """Bit groups of the pilot: sign, top exponent bit, other exponent bits, mantissa (FP);
    sign, bits 5-6, bits 0-4 (INT8)."""
    f = get_format(fmt)
    if isinstance(f, FloatFormat):
        m, top = f.man_bits, f.bits - 2
        return [np.array([f.bits - 1]), np.array([top]), np.arange(m, top), np.arange(m)]
    return [np.array([f.bits - 1]), np.arange(5, f.bits - 1), np.arange(0, 5)]


class PilotProposal(Proposal):
    """Per-(tensor, bit group) mean |drop| from a pilot of ``n`` faults per stratum."""

    name = "pilot"

    def __init__(self, n: int = 2, floor: float = 0.05) -> None:
        if n < 1:
            raise ConfigError(f"--pilot: expected a positive count, got {n}")
        self.n, self.floor = int(n), float(floor)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "floor": self.floor}

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        if ctx.evaluate is None or ctx.golden_accuracy is None:
            raise ConfigError("proposal 'pilot': needs an evaluator and the golden accuracy")
        beta, groups = bit_sensitivity(ctx.fmt), bit_groups(ctx.fmt)
        rng = np.random.default_rng([int(ctx.seed), 7_000_001])
        strata: list[tuple[Block, np.ndarray, float]] = []
        batches: list[Sites] = []
        for b in p.blocks:
            for g in groups:
                bw = np.zeros_like(b.bit_weights)
                bw[g] = b.bit_weights[g]
                if bw.sum() <= 0:
                    continue
                one = SiteDistribution([Block(b.target, b.layer, b.shape, bw, b.terms)])
                s = one.sample(rng, self.n)
                batches.append(Sites(p.keys, np.full(self.n, p.keys.index(b.key)),
                                     s.index, s.bit))
                strata.append((b, g, b.element_mass * float(bw.sum())))
        allsites = Sites(p.keys, *(np.concatenate([getattr(s, a) for s in batches])
                                   for a in ("block", "index", "bit")))
        acc = np.asarray(ctx.evaluate(allsites), float)
        drops = np.abs(ctx.golden_accuracy - acc).reshape(len(strata), self.n).mean(axis=1)
        floor = self.floor * max(float(drops.max()), 1e-6)
        new = {b.key: np.zeros_like(b.bit_weights) for b in p.blocks}
        for (b, g, mass), dm in zip(strata, drops, strict=True):
            inner = b.bit_weights[g] * beta[g]
            if inner.sum() <= 0:
                inner = b.bit_weights[g].copy()
            new[b.key][g] = mass * (dm + floor) * inner / inner.sum() / b.element_mass
        ctx.info["pilot"] = {"faults": int(len(allsites)), "strata": len(strata),
                             "max_mean_drop": float(drops.max())}
        return _with_bits(p, new, self.name)


class GradientProposal(Proposal):
    """``h ~ P x (s / mean s + floor) ** power x beta(bit)``, ``s = |value x gradient|`` from
    one backward pass (tempered: a flip of the top exponent bit is critical whatever the
    gradient, so first-order sensitivity alone is too peaked)."""

    name = "gradient"

    def __init__(self, images: int = 32, power: float = 0.5, floor: float = 0.1) -> None:
        self.images, self.power, self.floor = int(images), float(power), float(floor)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "images": self.images, "power": self.power,
                "floor": self.floor}

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        if ctx.model is None or ctx.inputs is None:
            raise ConfigError("proposal 'gradient': needs the model and inputs")
        sens = _sensitivities(ctx, {b.key for b in p.blocks}, self.images)
        beta = bit_sensitivity(ctx.fmt)
        blocks = []
        for b in p.blocks:
            s = sens.get(b.key)
            bw = b.bit_weights * beta
            if s is None or s.size > DENSE_CAP:
                scale = float(s.mean()) if s is not None else 1.0
                blocks.append(Block(b.target, b.layer, b.shape, bw * scale, b.terms))
                continue
            rel = s.reshape(-1) / max(float(s.mean()), 1e-30)
            e = b.element_weights(np.arange(b.numel)) * (rel + self.floor) ** self.power
            blocks.append(Block(b.target, b.layer, b.shape, bw, [Term.full(e.reshape(b.shape))]))
        return SiteDistribution(blocks, name=self.name)


class SiteWeightProposal(Proposal):
    """``h ~ P x weight(site)``: plugs in any per-stratum or per-site criticality weights
    (e.g. a predictor's class priors). ``weights(target, layer, bit, numel)`` returns a
    float (the whole (tensor, bit) stratum), an array of ``numel`` per-element weights for
    that bit, or None (weight 1).

    >>> prior = lambda t, layer, bit, n: 10.0 if bit == 30 else None
    >>> register_proposal("bit30", lambda: SiteWeightProposal(prior))  # doctest: +SKIP
    """

    name = "site-weights"

    def __init__(self, weights: Callable[[str, str, int, int], Any],
                 name: str = "site-weights") -> None:
        self.weights, self.name = weights, name

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        blocks = []
        for b in p.blocks:
            bw, bit_terms, base = b.bit_weights.copy(), {}, None
            for bit in range(bw.size):
                w = self.weights(b.target, b.layer, bit, b.numel)
                if w is None:
                    continue
                if np.ndim(w) == 0:
                    bw[bit] *= float(w)
                    continue
                if base is None:
                    base = b.element_weights(np.arange(b.numel))
                arr = np.asarray(w, dtype=np.float64).reshape(-1)
                bit_terms[bit] = [Term.full((base * arr).reshape(b.shape))]
            blocks.append(Block(b.target, b.layer, b.shape, bw, b.terms, bit_terms or None))
        return SiteDistribution(blocks, name=self.name)


class CriticalityProposal(Proposal):
    """``h ~ P x π(class(site))``: the criticality predictor of
    :mod:`flipguard.criticality` (the one that stratifies campaigns) classifies every
    (element, bit) and ``π`` is its predicted probability of a critical flip per class
    (``CLASS_PRIORS``, or ``probs``). Built from the engine's task on ``ctx.inputs`` unless a
    ``predictor`` is given; a (tensor, bit) whose elements share one class costs one float.

    >>> q = defensive(p, CriticalityProposal().heuristic(p, ctx), 0.2)  # doctest: +SKIP
    """

    name = "criticality"

    def __init__(self, predictor: Any = None, criterion: str = "accuracy-drop:0.01",
                 max_images: int = 64, probs: Any = None) -> None:
        self.predictor, self.criterion, self.max_images = predictor, criterion, max_images
        self.probs = probs

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "criterion": self.criterion, "max_images": self.max_images}

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        pred = self.predictor
        if pred is None:
            if ctx.model is None or ctx.inputs is None:
                raise ConfigError("proposal 'criticality': needs the model and inputs")
            targets = tuple(sorted({b.target for b in p.blocks}))
            pred = Predictor.build(ctx.model, ctx.inputs, _task_of(ctx), self.criterion,
                                   targets=targets, layers=sorted({b.layer for b in p.blocks}),
                                   fmt=ctx.fmt, max_images=self.max_images)
        probs = np.asarray(CLASS_PRIORS if self.probs is None else self.probs, dtype=float)
        known = {(ls.target, ls.name) for ls in pred.space.layers}

        def weights(target: str, layer: str, bit: int, numel: int) -> Any:
            if (target, layer) not in known:
                return None
            w = probs[classes_of_rho(pred.rho(layer, target, None, [bit], ["flip"])[:, 0, 0],
                                     pred.edges)]
            return float(w[0]) if (w == w[0]).all() else w

        ctx.info["criticality"] = dict(pred.info)
        return SiteWeightProposal(weights, self.name).heuristic(p, ctx)


def _task_of(ctx: ProposalContext) -> Any:
    """The engine's task behind ``ctx.evaluate`` (an ``EngineEvaluator``, maybe cached), else
    a classification task of ``ctx.labels``."""
    ev = ctx.evaluate
    for obj in (ev, getattr(ev, "evaluate", None)):
        engine = getattr(obj, "engine", None)
        if engine is not None:
            return engine.task
    if ctx.task == "classification" and ctx.labels is not None:
        return ClassificationTask(ctx.labels)
    raise ConfigError("proposal 'criticality': needs the engine's task (detector threshold)")


def _sensitivities(ctx: ProposalContext, keys: set[tuple[str, str]],
                   images: int) -> dict[tuple[str, str], np.ndarray]:
    model, x = ctx.model, ctx.inputs[:images]
    assert model is not None
    mods = dict(model.named_modules())
    acts: dict[str, Tensor] = {}

    def keep(name: str, _m: nn.Module, _i: tuple, out: Any) -> None:
        acts[name] = out

    hooked = {ly: mods[ly] for t, ly in keys if t == "activation" and ly in mods}
    params = {(t, ly): getattr(mods[ly], t) for t, ly in keys
              if t != "activation" and isinstance(getattr(mods.get(ly), t, None), Tensor)}
    with eval_mode(model), forward_hooks(hooked, keep), torch.enable_grad():
        out = model(x)
        if ctx.task == "classification" and ctx.labels is not None:
            y = torch.as_tensor(np.asarray(ctx.labels)[:images], dtype=torch.long)
            loss = F.cross_entropy(out, y, reduction="sum")
        elif out.shape == x.shape:
            loss = F.mse_loss(out, x, reduction="sum")
        else:
            loss = out.abs().sum()
        act_keys = [("activation", ly) for t, ly in sorted(keys)
                    if t == "activation" and ly in acts]
        names = list(params) + act_keys
        wrt = list(params.values()) + [acts[ly] for _, ly in act_keys]
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    res = {}
    for key, v, g in zip(names, wrt, grads, strict=True):
        if g is None:
            continue
        s = (v.detach() * g).abs()
        if key[0] == "activation":
            s = s.mean(dim=0)
        res[key] = s.double().numpy()
    return res


PROPOSALS: dict[str, Callable[..., Proposal]] = {
    "bitfield": BitFieldProposal, "pilot": PilotProposal, "gradient": GradientProposal,
    "criticality": CriticalityProposal}  # + "adaptive", registered by flipguard.ra.adaptive


def register_proposal(name: str, factory: Callable[..., Proposal]) -> None:
    """Make ``factory`` available as ``--proposal name`` (e.g. a criticality predictor)."""
    PROPOSALS[name] = factory


def make_proposal(name: str | Proposal, **kwargs: Any) -> Proposal:
    """Proposal by name (``adaptive`` | ``bitfield`` | ``pilot`` | ``gradient`` |
    ``criticality`` | registered ones)."""
    if isinstance(name, Proposal):
        return name
    if name not in PROPOSALS:
        raise ConfigError(f"--proposal: expected one of {', '.join(PROPOSALS)}, got {name!r}")
    return PROPOSALS[name](**kwargs)


def defensive(p: SiteDistribution, h: SiteDistribution, alpha: float = 0.2) -> Mixture:
    """``q = alpha * P + (1 - alpha) * h``: importance weights ``P/q`` are at most
    ``1/alpha``."""
    if not 0 < alpha <= 1:
        raise ConfigError(f"--alpha: expected a value in (0, 1], got {alpha}")
    return Mixture([p, h], [alpha, 1 - alpha])
