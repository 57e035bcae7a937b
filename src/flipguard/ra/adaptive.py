"""The ``adaptive`` importance-sampling proposal: no pilot, cell masses re-fitted after every
batch of the estimation itself (see :class:`AdaptiveMixture`).

Registered as ``--proposal adaptive`` (the default of ``flipguard ra``) when
:mod:`flipguard.ra` is imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flipguard.errors import ConfigError
from flipguard.faults import NumberFormat
from flipguard.ra.confseq import reach
from flipguard.ra.distribution import Block, Distribution, Mixture, SiteDistribution, Sites
from flipguard.ra.proposal import (
    BitFieldProposal,
    CriticalityProposal,
    Proposal,
    ProposalContext,
    bit_groups,
    defensive,
    register_proposal,
)
from flipguard.ra.weights import cell_ratios

__all__ = ["AdaptiveMixture", "AdaptiveProposal", "SHARES"]

SHARES = np.array([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0])
"""Defensive shares the adaptive proposal may pick from (those >= its ``alpha``)."""


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
    terms is unbiased (a martingale), which is what the confidence sequence of
    :func:`~flipguard.ra.estimators.estimate_ra` needs. ``P/q_b <= 1/alpha``;
    :meth:`weight_bound` gives the exact ``sup P/q_b`` before each batch.

    >>> q = AdaptiveMixture(p, CriticalityProposal().heuristic(p, ctx), 0.2)  # doctest: +SKIP
    """

    def __init__(self, p: SiteDistribution, start: SiteDistribution, alpha: float = 0.2,
                 kappa: float = 1.0, fmt: str | NumberFormat = "fp32",
                 keep_shape: bool = True, tune_alpha: bool = True,
                 golden: float | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ConfigError(f"--alpha: expected a value in (0, 1], got {alpha}")
        if not kappa > 0:
            raise ConfigError(f"adaptive: kappa must be positive, got {kappa}")
        if start.keys != p.keys:
            raise ConfigError("adaptive: the start heuristic must have P's (target, layer) "
                              "blocks")
        self.p, self.start, self.alpha, self.kappa = p, start, float(alpha), float(kappa)
        self.keep_shape, self.tune_alpha = bool(keep_shape), bool(tune_alpha)
        self.golden = 1.0 if golden is None else float(golden)  # upper bound of a drop
        self.shares = np.unique(np.r_[self.alpha, SHARES[SHARES > self.alpha]])
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
        self._rmin: np.ndarray | None = None  # within-cell min of start shape / P shape
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
        self.a = self.alpha  # defensive share of the current q_b
        self.alphas: list[float] = []
        self.sum_wd, self.n_all = 0.0, 0
        self._nz: list[tuple[np.ndarray, ...]] = []  # non-zero drops: blk, bit, 1/rho, w, d
        self.q: Mixture = defensive(self.p, self.start, self.a)

    def sample(self, rng: np.random.Generator, n: int) -> Sites:
        return self.q.sample(rng, n)

    def weight_bound(self) -> float:
        """``sup_s P(s) / q_b(s)`` of the current ``q_b`` (known before the batch is drawn,
        so a valid per-batch term bound): ``1 / (alpha + (1 - alpha) min_c (H_c / P_c) r_c)``
        with ``r_c`` the smallest within-cell ratio of ``h``'s shape to ``P``'s (1 where
        ``h`` is filled like ``P``); at most ``1 / alpha``."""
        live = self.pc > 0
        if self._rmin is None:
            self._rmin = cell_ratios(self.start, self.p, self.nbits)[0]
        ratio = np.where(self.shape_now, self._rmin, 1.0)
        hp = np.divide(self.hc, self.pc, out=np.zeros_like(self.hc), where=live)
        m = float(np.where(live, hp * np.where(live, ratio, 0.0), np.inf).min())
        m = 0.0 if not np.isfinite(m) else m
        return 1.0 / (self.a + (1 - self.a) * m)

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
        a = self.a
        qc = a * self.pc[blk, bit] + (1 - a) * self.hc[blk, bit]
        q_in = (a * self.pc[blk, bit] * p_in + (1 - a) * self.hc[blk, bit] * phi_now) / qc
        u = np.divide(p_in, q_in, out=np.zeros_like(p_in), where=q_in > 0)
        phi = np.where(self.shaped[blk, bit], self._within(self.start, s, blk), p_in)
        rho = np.divide(p_in, phi, out=np.zeros_like(p_in), where=phi > 0)
        w = np.divide(self.pc[blk, bit] * p_in, qc * q_in, out=np.zeros_like(p_in),
                      where=q_in > 0)  # P / q_b
        self.wd2 += float(np.sum(w * d2))
        d = np.asarray(drops, float)[ok]
        self.sum_wd += float(np.sum(w * d))
        self.n_all += int(d.size)
        nz = d != 0
        inv_rho = np.divide(phi, p_in, out=np.zeros_like(p_in), where=p_in > 0)
        self._nz.append((blk[nz], bit[nz], inv_rho[nz], w[nz], d[nz]))
        np.add.at(self.n, (blk, bit), 1.0)
        np.add.at(self.s, (blk, bit), u * rho * d2)
        self.updates += 1
        r = self.cell_rms()
        if r.max() <= 0:
            return
        mass = self.pc * r
        self.hc = mass / mass.sum()
        self.shape_now = self.shaped.copy()
        if self.tune_alpha and len(self.shares) > 1:
            self.a = self._choose_share()
        self.alphas.append(self.a)
        self.q = defensive(self.p, self._h(), self.a)

    def _choose_share(self) -> float:
        """The defensive share (of ``SHARES`` >= ``alpha``) whose confidence sequence is
        predicted (:func:`~flipguard.ra.confseq.reach`) to be narrowest after twice the
        samples so far, with the variance of each share estimated from every sample (the
        non-zero drops, re-weighted to that share's proposal) and its weight bound."""
        blk, bit, inv_rho, w, d = (np.concatenate(x) for x in zip(*self._nz, strict=True))
        n = max(self.n_all, 1)
        mean = self.sum_wd / n
        r = np.divide(self.hc[blk, bit], self.pc[blk, bit], out=np.zeros(blk.size),
                      where=self.pc[blk, bit] > 0) * inv_rho  # h_b / P at those sites
        a_now, best = self.a, (np.inf, self.a)
        for a in self.shares:
            self.a = float(a)
            bound = self.weight_bound()
            var = max(float(np.sum(w * d * d / (a + (1 - a) * r))) / n - mean * mean, 1e-12)
            width = reach(2 * n, var, mean, bound * (self.golden - 1), bound * self.golden)
            best = min(best, (width, float(a)))
        self.a = a_now
        return best[1]

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
        return {"updates": self.updates, "samples": int(self.n.sum()), "top_cells": cells,
                "alpha": self.alpha, "alpha_now": self.a,
                "alpha_mean": float(np.mean(self.alphas)) if self.alphas else self.a}


class AdaptiveProposal(Proposal):
    """No pilot: ``h`` starts as the ``start`` heuristic (``criticality``, the default: the
    criticality predictor's per-site classes, no injection; ``bitfield``; or any
    :class:`Proposal`) and its (tensor, bit) cell masses are re-fitted after every batch
    (:class:`AdaptiveMixture`)."""

    name = "adaptive"

    def __init__(self, kappa: float = 1.0, start: str | Proposal = "criticality",
                 keep_shape: bool = True, tune_alpha: bool = True) -> None:
        if isinstance(start, str) and start not in ("criticality", "bitfield"):
            raise ConfigError(f"adaptive: start must be 'criticality' or 'bitfield', got "
                              f"{start!r}")
        self.kappa, self.keep_shape = float(kappa), bool(keep_shape)
        self.tune_alpha = bool(tune_alpha)
        self.start = (CriticalityProposal() if start == "criticality" else BitFieldProposal()
                      if start == "bitfield" else start)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "kappa": self.kappa, "start": self.start.config(),
                "keep_shape": self.keep_shape, "tune_alpha": self.tune_alpha}

    def heuristic(self, p: SiteDistribution, ctx: ProposalContext) -> SiteDistribution:
        """The starting heuristic."""
        return self.start.heuristic(p, ctx)

    def mixture(self, p: SiteDistribution, ctx: ProposalContext, alpha: float
                ) -> AdaptiveMixture:
        """The adaptive proposal ``q`` (pass it as ``q`` to ``estimate_ra``)."""
        return AdaptiveMixture(p, self.heuristic(p, ctx), alpha, self.kappa, ctx.fmt,
                               self.keep_shape, self.tune_alpha, ctx.golden_accuracy)


register_proposal("adaptive", AdaptiveProposal)
