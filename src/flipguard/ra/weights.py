"""Exact bounds on importance weights ``P(s) / q(s)`` between site distributions.

A valid interval for an importance-sampling estimate needs a bound on its terms ``w * d``,
i.e. on the weights. :func:`cell_ratios` gives, per (tensor, bit) cell, the smallest and
largest ratio of two distributions' *within-cell* shapes (element weights normalised in the
cell), computed element by element (once per distinct set of element terms of a block, so
per-bit arrays cost one pass per bit); :func:`max_ratio` turns that into
``sup_s num(s) / den(s)``.

>>> import numpy as np
>>> from flipguard.ra.distribution import Block, SiteDistribution, Term
>>> a = SiteDistribution([Block("weight", "fc", (2,), np.ones(2), [Term.full(np.array([1., 3.]))])])
>>> b = SiteDistribution([Block("weight", "fc", (2,), np.ones(2), [Term.const((2,), 1.0)])])
>>> max_ratio(a, b), max_ratio(b, a)
(1.5, 2.0)
"""

from __future__ import annotations

import numpy as np

from flipguard.ra.distribution import Block, SiteDistribution

__all__ = ["cell_ratios", "max_ratio"]


def _shape_ratio(nb: Block, db: Block, bit: int) -> tuple[float, float]:
    """Min (over elements ``den > 0``) and max (over elements ``num > 0``) of
    ``(num_e / sum num_e) / (den_e / sum den_e)`` for one bit."""
    idx = np.arange(db.numel)
    en, ed = nb.element_weights(idx, bit), db.element_weights(idx, bit)
    sn, sd = float(en.sum()), float(ed.sum())
    if sd <= 0:
        return np.inf, (np.inf if sn > 0 else 0.0)
    if sn <= 0:
        return 0.0, 0.0
    pos = ed > 0
    r = (en[pos] / sn) / (ed[pos] / sd)
    rmin = float(r.min())
    rmax = np.inf if (en[~pos] > 0).any() else float(r.max())
    return rmin, rmax


def cell_ratios(num: SiteDistribution, den: SiteDistribution, nbits: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(rmin, rmax)``, shape ``(len(den.blocks), nbits)``: extremes of the within-cell
    shape ratio ``num(s | c) / den(s | c)`` per (den block, bit) cell (``rmin`` over sites
    with ``den > 0``, ``rmax`` over sites with ``num > 0``; 0 where ``num`` has no block)."""
    nbits = nbits or max(b.bit_weights.size for b in den.blocks)
    rmin, rmax = np.zeros((len(den.blocks), nbits)), np.zeros((len(den.blocks), nbits))
    for i, db in enumerate(den.blocks):
        nb = num.block(*db.key)
        if nb is None or nb.numel != db.numel:
            continue
        done: dict[tuple[int, int], tuple[float, float]] = {}
        for bit in range(min(nbits, db.bit_weights.size, nb.bit_weights.size)):
            key = (id(nb.terms_of(bit)), id(db.terms_of(bit)))
            if key not in done:
                done[key] = _shape_ratio(nb, db, bit)
            rmin[i, bit], rmax[i, bit] = done[key]
    return rmin, rmax


def max_ratio(num: SiteDistribution, den: SiteDistribution) -> float:
    """``sup_s num(s) / den(s)`` over the sites ``num`` can produce (``inf`` when ``den``
    misses one of them)."""
    for nb in num.blocks:
        db = den.block(*nb.key)
        if db is None or db.numel != nb.numel or db.bit_weights.size < nb.bit_weights.size:
            return np.inf
    nbits = max(b.bit_weights.size for b in den.blocks)
    _, rmax = cell_ratios(num, den, nbits)
    best = 0.0
    for i, db in enumerate(den.blocks):
        nb = num.block(*db.key)
        if nb is None:
            continue
        nc = nb.bit_mass / num.total
        dc = db.bit_mass[: nc.size] / den.total
        for bit in np.flatnonzero(nc > 0):
            if dc[bit] <= 0:
                return np.inf
            best = max(best, float(nc[bit] / dc[bit] * rmax[i, bit]))
    return best
