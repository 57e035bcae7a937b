"""Compact probability distributions over fault sites ``(target, layer, index, bit)``.

A :class:`SiteDistribution` is a list of :class:`Block` s, one per target tensor. A block's
weight of site ``(index, bit)`` is ``e(index) * bit_weights[bit]``, where the per-element
weight ``e`` is a sum of :class:`Term` s. A term views the tensor's flat (C-order) index as
coordinates of a ``shape`` and is ``table[class_0(c_0), ..., class_D(c_D)] * prod_d
factor_d(c_d)``: per-tile-class tables, per-axis position factors, constants, or (for small
tensors) a full per-element array. Nothing is ever materialised per site; sampling is exact
(class tuple, then each coordinate within its class) and so is :meth:`SiteDistribution.prob`.

>>> import numpy as np
>>> d = SiteDistribution([Block("weight", "fc", (2, 3), np.ones(4),
...                             [Term.axis((2, 3), 1, np.array([1.0, 2.0, 1.0]))])])
>>> s = d.sample(np.random.default_rng(0), 5)
>>> float(d.prob(Sites.from_records([("weight", "fc", 1, 0)]))[0])
0.0625
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from flipguard.errors import ConfigError
from flipguard.faults import Fault, FaultSite

__all__ = ["Term", "Block", "Sites", "SiteDistribution", "Mixture", "Distribution"]

Key = tuple[str, str]


class Term:
    """Non-negative per-element weights on a ``shape`` view of a tensor (see module doc).

    ``classes[d]``: class id of each coordinate of axis ``d`` (None: one class);
    ``factors[d]``: non-negative factor of each coordinate (None: 1).

    >>> Term.const((2, 2), 3.0).mass
    12.0
    """

    def __init__(self, shape: Sequence[int], table: np.ndarray | float,
                 classes: Sequence[np.ndarray | None] | None = None,
                 factors: Sequence[np.ndarray | None] | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        nd = len(self.shape)
        cl = list(classes) if classes is not None else [None] * nd
        fa = list(factors) if factors is not None else [None] * nd
        if len(cl) != nd or len(fa) != nd:
            raise ConfigError(f"term: expected {nd} classes/factors for shape {self.shape}")
        self.classes = [None if c is None else np.asarray(c, dtype=np.int64) for c in cl]
        self.factors = [None if f is None else np.asarray(f, dtype=np.float64) for f in fa]
        ncls = [1 if c is None else (int(c.max()) + 1 if c.size else 1) for c in self.classes]
        tab = np.asarray(table, dtype=np.float64)
        self.table = np.broadcast_to(tab.reshape(tab.shape + (1,) * (nd - tab.ndim))
                                     if tab.ndim < nd else tab, tuple(ncls)).copy()
        for d in range(nd):
            for arr in (self.classes[d], self.factors[d]):
                if arr is not None and arr.shape != (self.shape[d],):
                    raise ConfigError(f"term: axis {d} arrays must have length {self.shape[d]}")
        if (self.table < 0).any() or any(f is not None and (f < 0).any() for f in self.factors):
            raise ConfigError("term: weights must be non-negative")
        self._axes = [self._axis_prep(d, ncls[d]) for d in range(nd)]
        csum = self.table.copy()
        for d, (_, _, sums, *_) in enumerate(self._axes):
            csum = csum * sums.reshape((1,) * d + (-1,) + (1,) * (nd - d - 1))
        self._class_mass = csum.reshape(-1)
        self.mass = float(self._class_mass.sum())

    def _axis_prep(self, d: int, ncls: int):
        c, f = self.classes[d], self.factors[d]
        cls = np.zeros(self.shape[d], np.int64) if c is None else c
        fac = np.ones(self.shape[d]) if f is None else f
        order = np.argsort(cls, kind="stable")
        cum = np.cumsum(fac[order])
        sums = np.bincount(cls, weights=fac, minlength=ncls)
        first = np.searchsorted(cls[order], np.arange(ncls), side="left")
        start = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
        last = np.searchsorted(cls[order], np.arange(ncls), side="right") - 1
        return order, cum, sums, start, first, np.maximum(last, first)

    @classmethod
    def const(cls, shape: Sequence[int], value: float) -> Term:
        """Every element weighs ``value``."""
        return cls(shape, float(value))

    @classmethod
    def axis(cls, shape: Sequence[int], axis: int, factor: np.ndarray | None,
             classes: np.ndarray | None = None, table: np.ndarray | float = 1.0) -> Term:
        """Weight ``factor[c_axis]`` (None: 1) times ``table[classes[c_axis]]`` along one
        axis."""
        nd = len(shape)
        cl: list[np.ndarray | None] = [None] * nd
        fa: list[np.ndarray | None] = [None] * nd
        cl[axis], fa[axis] = classes, factor
        tab = np.asarray(table, dtype=np.float64)
        if tab.ndim == 1:
            tab = tab.reshape((1,) * axis + (-1,) + (1,) * (nd - axis - 1))
        return cls(shape, tab, cl, fa)

    @classmethod
    def full(cls, array: np.ndarray) -> Term:
        """A full per-element weight array (for small tensors only)."""
        a = np.asarray(array, dtype=np.float64)
        return cls(a.shape, a, [np.arange(s) for s in a.shape], None)

    def values(self, index: np.ndarray) -> np.ndarray:
        """Weight of each flat ``index``."""
        coords = np.unravel_index(np.asarray(index, dtype=np.int64), self.shape)
        cls_idx, out = [], np.ones(len(np.atleast_1d(index)))
        for d, c in enumerate(coords):
            cl, f = self.classes[d], self.factors[d]
            cls_idx.append(np.zeros_like(c) if cl is None else cl[c])
            if f is not None:
                out = out * f[c]
        return out * self.table[tuple(cls_idx)]

    def lower_bound(self) -> float:
        """A lower bound of the smallest element weight (0 if unknown)."""
        lo = float(self.table.min())
        for f in self.factors:
            if f is not None:
                lo *= float(f.min())
        return lo

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` flat indices drawn with probability proportional to the weights."""
        cm = self._class_mass
        pick = rng.choice(cm.size, size=n, p=cm / cm.sum())
        cls_t = np.unravel_index(pick, self.table.shape)
        coords = []
        for d, (order, cum, sums, start, first, last) in enumerate(self._axes):
            c = cls_t[d]
            target = start[c] + rng.random(n) * sums[c]
            pos = np.clip(np.searchsorted(cum, target, side="right"), first[c], last[c])
            coords.append(order[pos])
        return np.ravel_multi_index(tuple(coords), self.shape).astype(np.int64)


@dataclass
class Block:
    """Sites of one target tensor: element weights (sum of ``terms``) x ``bit_weights``.

    ``bit_terms`` (optional) gives other element weights for some bits (per-site weights,
    e.g. from a criticality predictor): bit ``b`` then weighs ``bit_weights[b] * e_b``.
    """

    target: str
    layer: str
    shape: tuple[int, ...]
    bit_weights: np.ndarray
    terms: list[Term]
    bit_terms: dict[int, list[Term]] | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.bit_weights = np.asarray(self.bit_weights, dtype=np.float64)
        self.numel = math.prod(self.shape)
        extra = [t for ts in (self.bit_terms or {}).values() for t in ts]
        for t in self.terms + extra:
            if math.prod(t.shape) != self.numel:
                raise ConfigError(f"block {self.target}:{self.layer}: term view {t.shape} "
                                  f"does not match {self.numel} elements")
        self.terms = [t for t in self.terms if t.mass > 0]
        self.bit_terms = {int(b): [t for t in ts if t.mass > 0]
                          for b, ts in (self.bit_terms or {}).items()}
        self.element_mass = float(sum(t.mass for t in self.terms))
        self.bit_mass = self.bit_weights * np.array(
            [sum(t.mass for t in self.terms_of(b)) for b in range(self.bit_weights.size)])
        self.mass = float(self.bit_mass.sum())

    @property
    def key(self) -> Key:
        return (self.target, self.layer)

    def terms_of(self, bit: int) -> list[Term]:
        """Element-weight terms of ``bit``."""
        return self.bit_terms.get(int(bit), self.terms) if self.bit_terms else self.terms

    def element_weights(self, index: np.ndarray, bit: int | None = None) -> np.ndarray:
        """Element weight ``e(index)`` (of ``bit`` when the block has per-bit terms)."""
        out = np.zeros(len(np.atleast_1d(index)))
        for t in self.terms if bit is None else self.terms_of(bit):
            out += t.values(index)
        return out

    def site_weights(self, index: np.ndarray, bit: np.ndarray) -> np.ndarray:
        """Unnormalised weight of sites ``(index, bit)``."""
        if not self.bit_terms:
            return self.element_weights(index) * self.bit_weights[bit]
        out = np.zeros(len(index))
        for b in np.unique(bit):
            sel = bit == b
            out[sel] = self.element_weights(index[sel], int(b)) * self.bit_weights[b]
        return out

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (index, bit) pairs from this block."""
        bm = self.bit_mass
        bits = rng.choice(bm.size, size=n, p=bm / bm.sum()).astype(np.int64)
        idx = np.empty(n, np.int64)
        groups = [(None, np.arange(n))] if not self.bit_terms else [
            (int(b), np.flatnonzero(bits == b)) for b in np.unique(bits)]
        for b, rows in groups:
            terms = self.terms if b is None else self.terms_of(b)
            masses = np.array([t.mass for t in terms])
            which = rng.choice(len(masses), size=rows.size, p=masses / masses.sum())
            for i, t in enumerate(terms):
                sel = rows[which == i]
                if sel.size:
                    idx[sel] = t.sample(rng, sel.size)
        return idx, bits


@dataclass
class Sites:
    """A batch of sites as arrays; ``keys[block[i]]`` is the (target, layer) of site ``i``.

    >>> Sites.from_records([("weight", "fc", 3, 30)]).faults()[0].bits
    (30,)
    """

    keys: tuple[Key, ...]
    block: np.ndarray
    index: np.ndarray
    bit: np.ndarray

    def __len__(self) -> int:
        return int(self.block.size)

    @classmethod
    def from_records(cls, records: Iterable[Sequence]) -> Sites:
        """From ``(target, layer, index, bit)`` tuples."""
        recs = list(records)
        keys: dict[Key, int] = {}
        blk = [keys.setdefault((str(r[0]), str(r[1])), len(keys)) for r in recs]
        return cls(tuple(keys), np.asarray(blk, np.int64),
                   np.asarray([int(r[2]) for r in recs], np.int64),
                   np.asarray([int(r[3]) for r in recs], np.int64))

    def records(self) -> list[tuple[str, str, int, int]]:
        """``(target, layer, index, bit)`` tuples."""
        return [(*self.keys[b], int(i), int(t))
                for b, i, t in zip(self.block.tolist(), self.index.tolist(), self.bit.tolist(),
                                   strict=True)]

    def sites(self) -> list[FaultSite]:
        return [FaultSite(*r) for r in self.records()]

    def faults(self, kind: str = "flip") -> list[Fault]:
        """Single-bit :class:`~flipguard.faults.Fault` s of these sites."""
        return [Fault(t, layer, i, (b,), kind) for t, layer, i, b in self.records()]

    def take(self, sel: np.ndarray) -> Sites:
        return Sites(self.keys, self.block[sel], self.index[sel], self.bit[sel])


class Distribution:
    """Interface: ``keys``, ``sample(rng, n) -> Sites``, ``prob(sites) -> array``."""

    keys: tuple[Key, ...]

    def sample(self, rng: np.random.Generator, n: int) -> Sites:  # pragma: no cover
        raise NotImplementedError

    def prob(self, sites: Sites) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@dataclass
class SiteDistribution(Distribution):
    """Normalised distribution over the sites of ``blocks`` (see module docstring)."""

    blocks: list[Block]
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = [b for b in self.blocks if b.mass > 0]
        if not self.blocks:
            raise ConfigError(f"exposure {self.name or ''}: no fault site has positive weight")
        self.keys = tuple(b.key for b in self.blocks)
        if len(set(self.keys)) != len(self.keys):
            raise ConfigError("distribution: duplicate (target, layer) blocks")
        self._pos = {k: i for i, k in enumerate(self.keys)}
        self.masses = np.array([b.mass for b in self.blocks])
        self.total = float(self.masses.sum())

    def block(self, target: str, layer: str) -> Block | None:
        i = self._pos.get((target, layer))
        return None if i is None else self.blocks[i]

    def sample(self, rng: np.random.Generator, n: int) -> Sites:
        """``n`` sites drawn independently (exactly) from the distribution."""
        blk = rng.choice(len(self.blocks), size=n, p=self.masses / self.total)
        idx, bit = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for i, b in enumerate(self.blocks):
            sel = np.flatnonzero(blk == i)
            if sel.size:
                idx[sel], bit[sel] = b.sample(rng, sel.size)
        return Sites(self.keys, blk.astype(np.int64), idx, bit)

    def prob(self, sites: Sites) -> np.ndarray:
        """Probability of each site (0 for sites outside the distribution)."""
        out = np.zeros(len(sites))
        for j, key in enumerate(sites.keys):
            i = self._pos.get(key)
            sel = np.flatnonzero(sites.block == j)
            if i is None or not sel.size:
                continue
            b = self.blocks[i]
            bits = sites.bit[sel]
            ok = (bits >= 0) & (bits < b.bit_weights.size) & (sites.index[sel] >= 0) & (
                sites.index[sel] < b.numel)
            vals = np.zeros(sel.size)
            vals[ok] = b.site_weights(sites.index[sel][ok], bits[ok])
            out[sel] = vals / self.total
        return out

    def shares(self) -> dict[str, float]:
        """Probability mass per target (e.g. ``{"weight": 0.3, "activation": 0.7}``)."""
        out: dict[str, float] = {}
        for b in self.blocks:
            out[b.target] = out.get(b.target, 0.0) + b.mass / self.total
        return out

    def layer_shares(self) -> dict[str, float]:
        """Probability mass per ``target:layer`` block."""
        return {f"{b.target}:{b.layer}": b.mass / self.total for b in self.blocks}

    def covers(self, other: SiteDistribution) -> bool:
        """True when every site with positive probability under ``other`` provably has positive
        probability here (needed to re-weight samples drawn from this distribution)."""
        for ob in other.blocks:
            b = self.block(*ob.key)
            if b is None or b.numel != ob.numel or b.bit_weights.size != ob.bit_weights.size:
                return False
            for bit in np.flatnonzero(ob.bit_mass > 0):
                if b.bit_weights[bit] <= 0 or sum(t.lower_bound() for t in b.terms_of(bit)) <= 0:
                    return False
        return True

    def enumerate(self, limit: int = 2_000_000) -> tuple[Sites, np.ndarray]:
        """Every site and its probability (tiny models only; at most ``limit`` sites)."""
        n = sum(b.numel * b.bit_weights.size for b in self.blocks)
        if n > limit:
            raise ConfigError(f"enumerate: {n} sites exceed the limit of {limit}")
        blk, idx, bit = [], [], []
        for i, b in enumerate(self.blocks):
            nb = b.bit_weights.size
            e = np.repeat(np.arange(b.numel, dtype=np.int64), nb)
            blk.append(np.full(e.size, i, np.int64))
            idx.append(e)
            bit.append(np.tile(np.arange(nb, dtype=np.int64), b.numel))
        sites = Sites(self.keys, np.concatenate(blk), np.concatenate(idx), np.concatenate(bit))
        return sites, self.prob(sites)


class Mixture(Distribution):
    """``sum_i weights[i] * parts[i]`` of distributions over the same keys, e.g. the defensive
    importance-sampling proposal ``q = alpha * P + (1 - alpha) * h``.

    >>> q = Mixture([p, h], [0.2, 0.8])  # doctest: +SKIP
    """

    def __init__(self, parts: Sequence[Distribution], weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(parts) != w.size or (w < 0).any() or w.sum() <= 0:
            raise ConfigError("mixture: expected one non-negative weight per part")
        self.parts, self.weights = list(parts), w / w.sum()
        self.keys = parts[0].keys
        for p in self.parts[1:]:
            if p.keys != self.keys:
                raise ConfigError("mixture: parts must share the same (target, layer) blocks")

    def sample(self, rng: np.random.Generator, n: int) -> Sites:
        which = rng.choice(len(self.parts), size=n, p=self.weights)
        blk, idx, bit = (np.zeros(n, np.int64) for _ in range(3))
        for i, p in enumerate(self.parts):
            sel = np.flatnonzero(which == i)
            if sel.size:
                s = p.sample(rng, sel.size)
                blk[sel], idx[sel], bit[sel] = s.block, s.index, s.bit
        return Sites(self.keys, blk, idx, bit)

    def prob(self, sites: Sites) -> np.ndarray:
        return sum(w * p.prob(sites) for w, p in zip(self.weights, self.parts, strict=True))
