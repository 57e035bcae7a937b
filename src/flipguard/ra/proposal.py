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
  (:class:`AdaptiveProposal`, :class:`AdaptiveMixture`);
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

from flipguard.errors import ConfigError
from flipguard.faults import FloatFormat, NumberFormat, get_format
from flipguard.ra.distribution import (
    Block,
    Distribution,
    Mixture,
    SiteDistribution,
    Sites,
    Term,
)

__all__ = ["ProposalContext", "Proposal", "BitFieldProposal", "PilotProposal",
           "AdaptiveProposal", "AdaptiveMixture",
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


class AdaptiveMixture(Distribution):
    """Adaptive defensive proposal ``q_b = alpha * P + (1 - alpha) * h_b`` for batch ``b``:
    ``h_b`` keeps the ``start`` heuristic's shape *inside* every (tensor, bit) cell and
    re-fits the cells' masses from the samples of batches ``< b`` (:meth:`update`).

    Why: with a fixed within-cell shape ``phi_c``, the per-sample variance of the IS term
    (ignoring the defensive part) is ``sum_c A_c / Q_c - D^2`` with ``A_c = P_c^2
    E_P[rho d^2 | c]`` (``rho = P(.|c) / phi_c``, the within-cell likelihood ratio; 1 for a
    cell-constant ``h``), minimised over the cell masses by ``Q_c ~ P_c sqrt(m_c)``, ``m_c =
    E_P[rho d^2 | c]`` -- for a cell-constant ``h``, the root-mean-square drop of the cell.
    ``m_c`` is estimated from the samples that landed in ``c`` (any batch), each weighted by
    ``u = P(s|c) / q_b(s|c)`` (exactly 1 when ``q_b`` is proportional to ``P`` in ``c``).
    Sparse cells are shrunk towards the same bit of the tensors of the same target (weights,
    activations, biases behave differently: a weight's high exponent bits are mostly 1s, an
    activation's vary per image), that towards the (target, bit group) and that towards the
    bit group over all tensors (sign / top exponent bit / other exponent bits / mantissa),
    itself shrunk towards ``E_P[d^2]`` estimated by the mean of ``(P/q_b) d^2`` over all
    samples (unbiased; what a cell about which nothing is known is worth -- it keeps rarely
    sampled groups explored): ``m = (S + kappa * m_parent) / (n + kappa)``. Until a non-zero
    drop is seen ``h`` is the ``start`` heuristic. With
    ``keep_shape=False`` the cells are filled like ``P`` (``phi_c = P(.|c)``) after the
    first update.

    Unbiasedness: ``q_b`` depends only on earlier batches and every ``q_b >= alpha * P``, so
    each term ``(P/q_b) * d`` has conditional mean ``D`` given the past; the plain mean of all
    terms is unbiased (a martingale) and its pooled sample variance estimates the variance of
    that mean (all terms share the mean ``D``). ``P/q_b <= 1/alpha``.

    >>> q = AdaptiveMixture(p, CriticalityProposal().heuristic(p, ctx), 0.2)  # doctest: +SKIP
    """

    def __init__(self, p: SiteDistribution, start: SiteDistribution, alpha: float = 0.2,
                 kappa: float = 1.0, fmt: str | NumberFormat = "fp32",
                 keep_shape: bool = True) -> None:
        if not 0 < alpha <= 1:
            raise ConfigError(f"--alpha: expected a value in (0, 1], got {alpha}")
        if not kappa > 0:
            raise ConfigError(f"adaptive: kappa must be positive, got {kappa}")
        if start.keys != p.keys:
            raise ConfigError("adaptive: the start heuristic must have P's (target, layer) "
                              "blocks")
        self.p, self.start, self.alpha, self.kappa = p, start, float(alpha), float(kappa)
        self.keep_shape = bool(keep_shape)
        self.keys = p.keys
        self.nbits = max(b.bit_weights.size for b in p.blocks)
        self.group = np.zeros(self.nbits, np.int64)
        for g, bits in enumerate(bit_groups(fmt)):
            self.group[bits[bits < self.nbits]] = g
        targets = sorted({b.target for b in p.blocks})
        self.tgt = np.zeros((len(targets), len(p.blocks)))  # target x block indicator
        for i, b in enumerate(p.blocks):
            self.tgt[targets.index(b.target), i] = 1.0
        self.pc, self.h0c = self._cells(p), self._cells(start)
        # within-cell shape: the start's where it has mass there, else P's
        self.shaped = self.keep_shape & (self.h0c > 0)
        self.reset()

    def _cells(self, d: SiteDistribution) -> np.ndarray:
        out = np.zeros((len(self.p.blocks), self.nbits))
        for i, b in enumerate(d.blocks):
            out[i, :b.bit_mass.size] = b.bit_mass / d.total
        return out

    def reset(self) -> None:
        """Forget every sample: back to the ``start`` heuristic."""
        shape = (len(self.p.blocks), self.nbits)
        self.n, self.s = np.zeros(shape), np.zeros(shape)
        self.wd2 = 0.0  # sum of (P/q_b) d^2: its mean estimates E_P[d^2] (unbiased)
        self.updates = 0
        self.hc = self.h0c.copy()
        self.shape_now = np.ones(shape, bool)  # current h: the start's shape in every cell
        self.q: Mixture = defensive(self.p, self.start, self.alpha)

    def sample(self, rng: np.random.Generator, n: int) -> Sites:
        return self.q.sample(rng, n)

    def prob(self, sites: Sites) -> np.ndarray:
        return self.q.prob(sites)

    def cell_rms(self) -> np.ndarray:
        """``sqrt(m)`` per (block, bit), ``m`` the shrunk estimate of ``E_P[rho d^2 | c]``
        (all 0 until a non-zero drop is seen). Levels: ``E_P[d^2]`` -> bit group (all
        tensors) -> (target, bit group) -> (target, bit) -> cell."""
        if self.s.sum() <= 0:
            return np.zeros_like(self.n)
        k, ng = self.kappa, int(self.group.max()) + 1

        def by_group(a: np.ndarray) -> np.ndarray:  # (..., bits) -> (..., groups)
            return np.stack([a[..., self.group == g].sum(axis=-1) for g in range(ng)], -1)

        tn, ts = self.tgt @ self.n, self.tgt @ self.s  # (targets, bits)
        m_0 = self.wd2 / max(self.n.sum(), 1.0)  # estimates E_P[d^2]
        m_g = (by_group(ts.sum(axis=0)) + k * m_0) / (by_group(tn.sum(axis=0)) + k)
        m_tg = (by_group(ts) + k * m_g[None, :]) / (by_group(tn) + k)
        m_tb = (ts + k * m_tg[:, self.group]) / (tn + k)
        m = (self.s + k * (self.tgt.T @ m_tb)) / (self.n + k)
        return np.sqrt(m)

    def _within(self, d: SiteDistribution, sites: Sites, blk: np.ndarray) -> np.ndarray:
        """``d(s | cell of s)`` for sites of known block ``blk`` (p's numbering)."""
        out = np.zeros(len(blk))
        for i in np.unique(blk):
            sel = np.flatnonzero(blk == i)
            b = d.block(*self.keys[i])
            if b is None:
                continue
            mass = b.bit_mass[sites.bit[sel]]
            w = b.site_weights(sites.index[sel], sites.bit[sel])
            out[sel] = np.divide(w, mass, out=np.zeros(sel.size), where=mass > 0)
        return out

    def update(self, sites: Sites, drops: np.ndarray) -> None:
        """Add a batch drawn from the current ``q`` (``drops = golden - accuracy``) and
        re-fit the cell masses of ``h``."""
        pos = np.array([self.keys.index(k) if k in self.keys else -1 for k in sites.keys],
                       np.int64)
        blk = pos[sites.block] if len(sites) else np.zeros(0, np.int64)
        ok = (blk >= 0) & (sites.bit >= 0) & (sites.bit < self.nbits)
        s = sites.take(np.flatnonzero(ok))
        blk, bit = blk[ok], s.bit
        d2 = np.asarray(drops, float)[ok] ** 2
        p_in = self._within(self.p, s, blk)
        # q_b(s | c) = (alpha P(s) + (1 - alpha) h_b(s)) / q_b(c), h_b(s) = H_c * phi_c(s)
        phi_now = np.where(self.shape_now[blk, bit], self._within(self.start, s, blk), p_in)
        qc = self.alpha * self.pc[blk, bit] + (1 - self.alpha) * self.hc[blk, bit]
        q_in = (self.alpha * self.pc[blk, bit] * p_in
                + (1 - self.alpha) * self.hc[blk, bit] * phi_now) / qc
        u = np.divide(p_in, q_in, out=np.zeros_like(p_in), where=q_in > 0)
        phi = np.where(self.shaped[blk, bit], self._within(self.start, s, blk), p_in)
        rho = np.divide(p_in, phi, out=np.zeros_like(p_in), where=phi > 0)
        self.wd2 += float(np.sum(np.divide(self.pc[blk, bit] * p_in, qc * q_in,
                                           out=np.zeros_like(p_in), where=q_in > 0) * d2))
        np.add.at(self.n, (blk, bit), 1.0)
        np.add.at(self.s, (blk, bit), u * rho * d2)
        self.updates += 1
        r = self.cell_rms()
        if r.max() <= 0:
            return
        mass = self.pc * r
        self.hc = mass / mass.sum()
        self.shape_now = self.shaped.copy()
        self.q = defensive(self.p, self._h(), self.alpha)

    def _h(self) -> SiteDistribution:
        blocks = []
        for i, pb in enumerate(self.p.blocks):
            sb = self.start.blocks[i]
            nb = pb.bit_weights.size
            bw, bit_terms = np.zeros(nb), {}
            for bit in range(nb):
                src = sb if self.shaped[i, bit] else pb
                terms = src.terms_of(bit)
                tm = sum(t.mass for t in terms)
                if self.hc[i, bit] <= 0 or tm <= 0:
                    continue
                bw[bit] = self.hc[i, bit] / tm
                bit_terms[bit] = terms
            blocks.append(Block(pb.target, pb.layer, pb.shape, bw, pb.terms, bit_terms))
        return SiteDistribution(blocks, name="adaptive")

    def summary(self, top: int = 5) -> dict[str, Any]:
        """The cells with the most proposal mass (for reports)."""
        cells = []
        for flat in np.argsort(self.hc, axis=None)[::-1][:top]:
            i, bit = np.unravel_index(flat, self.hc.shape)
            if self.hc[i, bit] <= 0:
                break
            cells.append({"cell": f"{':'.join(self.p.blocks[i].key)}:bit{int(bit)}",
                          "p": float(self.pc[i, bit]), "h": float(self.hc[i, bit]),
                          "samples": int(self.n[i, bit])})
        return {"updates": self.updates, "samples": int(self.n.sum()), "top_cells": cells}


class AdaptiveProposal(Proposal):
    """No pilot: ``h`` starts as the ``start`` heuristic (``criticality``, the default: the
    criticality predictor's per-site classes, no injection; ``bitfield``; or any
    :class:`Proposal`) and its (tensor, bit) cell masses are re-fitted after every batch
    (:class:`AdaptiveMixture`)."""

    name = "adaptive"

    def __init__(self, kappa: float = 1.0, start: str | Proposal = "criticality",
                 keep_shape: bool = True) -> None:
        if isinstance(start, str) and start not in ("criticality", "bitfield"):
            raise ConfigError(f"adaptive: start must be 'criticality' or 'bitfield', got "
                              f"{start!r}")
        self.kappa, self.keep_shape = float(kappa), bool(keep_shape)
        self.start = (CriticalityProposal() if start == "criticality" else BitFieldProposal()
                      if start == "bitfield" else start)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "kappa": self.kappa, "start": self.start.config(),
                "keep_shape": self.keep_shape}

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        """The starting heuristic."""
        return self.start.heuristic(p, ctx)

    def mixture(self, p: SiteDistribution, ctx: ProposalContext, alpha: float
                ) -> AdaptiveMixture:
        """The adaptive proposal ``q`` (pass it as ``q`` to ``estimate_ra``)."""
        return AdaptiveMixture(p, self.heuristic(p, ctx), alpha, self.kappa, ctx.fmt,
                               self.keep_shape)


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
        from flipguard.criticality import CLASS_PRIORS, Predictor, classes_of_rho

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
    from flipguard.inject import ClassificationTask

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
    handles = []
    for target, layer in keys:
        if target == "activation" and layer in mods:
            def hook(_m, _i, out, layer=layer):
                acts[layer] = out
            handles.append(mods[layer].register_forward_hook(hook))
    params = {(t, ly): getattr(mods[ly], t) for t, ly in keys
              if t != "activation" and isinstance(getattr(mods.get(ly), t, None), Tensor)}
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():
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
    finally:
        for h in handles:
            h.remove()
        model.train(was)
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
    "adaptive": AdaptiveProposal, "bitfield": BitFieldProposal, "pilot": PilotProposal,
    "gradient": GradientProposal, "criticality": CriticalityProposal}


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
