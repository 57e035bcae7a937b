"""Per-structure exposure of one tensor and how it becomes a :class:`Block` of ``P``.

A hardware model reports, per tensor, the bit-cycles of each element in each storage
structure: ``word`` terms count every stored bit of the element (its word in a register,
buffer or DRAM), ``acc`` terms every bit of an accumulator word that becomes the element
(partial sums). ``P(element, bit k)`` is proportional to

    sum_s w_s * word_s(element) + m_k * sum_s w_s * acc_s(element)

with ``w_s`` the structure's relative upset rate (0 when SEC-DED corrects it) and ``m_k`` the
expected number of accumulator bits whose hit acts as a flip of output bit ``k``
(:func:`flipguard.ra.accumulator.psum_map`; hits it masks leave ``P``).

>>> se = SiteExposure({"pe": [Term.const((2,), 3.0)]}, {"pe": [Term.const((2,), 1.0)]},
...                   np.eye(2, 3))
>>> b = se.block("activation", "fc", (2,), 2, {"pe": 0.5})
>>> float(b.mass)  # 2 elements x 2 bits x 0.5 x (3 word + 1 accumulator cycles)
8.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flipguard.ra.distribution import Block, Term

__all__ = ["SiteExposure", "scaled", "breakdown"]


def scaled(term: Term, factor: float) -> Term:
    """``term`` with every element weight multiplied by ``factor``."""
    return Term(term.shape, term.table * float(factor), term.classes, term.factors)


@dataclass
class SiteExposure:
    """Bit-cycles per element of one tensor, per structure (see module docstring).
    ``acc_map``: ``(acc_bits, fmt_bits + 1)`` shares of an accumulator-bit hit per output
    bit, last column masked (None: no ``acc`` terms)."""

    word: dict[str, list[Term]] = field(default_factory=dict)
    acc: dict[str, list[Term]] = field(default_factory=dict)
    acc_map: np.ndarray | None = None

    def _weighted(self, part: dict[str, list[Term]], weights: dict[str, float]) -> list[Term]:
        return [scaled(t, weights.get(s, 0.0)) for s, ts in part.items() for t in ts
                if weights.get(s, 0.0) > 0 and t.mass > 0]

    def bit_map(self, nbits: int) -> np.ndarray:
        """``m_k``: expected accumulator bits acting as output bit ``k`` (length ``nbits``)."""
        if self.acc_map is None:
            return np.zeros(nbits)
        return self.acc_map[:, :nbits].sum(axis=0)

    def masked_bits(self) -> float:
        """Expected accumulator bits whose hit the requantisation masks."""
        return 0.0 if self.acc_map is None else float(self.acc_map[:, -1].sum())

    def combined(self, weights: dict[str, float], nbits: int) -> list[Term]:
        """Bit-averaged element weights (exact when every output bit gets the same share)."""
        acc = self._weighted(self.acc, weights)
        mean = float(self.bit_map(nbits).mean()) if acc else 0.0
        return self._weighted(self.word, weights) + [scaled(t, mean) for t in acc if mean > 0]

    def block(self, target: str, layer: str, shape: tuple[int, ...], nbits: int,
              weights: dict[str, float]) -> Block:
        """The :class:`Block` of this tensor under structure ``weights``."""
        word, acc = self._weighted(self.word, weights), self._weighted(self.acc, weights)
        m = self.bit_map(nbits)
        if not acc or np.allclose(m, m[0]):
            return Block(target, layer, shape, np.ones(nbits), self.combined(weights, nbits))
        by_value: dict[float, list[Term]] = {}
        bit_terms = {}
        for k in range(nbits):
            v = float(m[k])
            if v not in by_value:
                by_value[v] = word + [scaled(t, v) for t in acc if v > 0]
            bit_terms[k] = by_value[v]
        return Block(target, layer, shape, np.ones(nbits), self.combined(weights, nbits),
                     bit_terms)

    def bit_cycles(self, nbits: int) -> dict[str, float]:
        """Raw bit-cycles (all ``nbits`` stored bits and all accumulator bits of every
        element) per structure."""
        out: dict[str, float] = {}
        for s, ts in self.word.items():
            out[s] = out.get(s, 0.0) + sum(t.mass for t in ts) * nbits
        acc_bits = 0 if self.acc_map is None else self.acc_map.shape[0]
        for s, ts in self.acc.items():
            out[s] = out.get(s, 0.0) + sum(t.mass for t in ts) * acc_bits
        return out


def breakdown(chosen: list[SiteExposure], nbits: int, total: float, weights: dict[str, float],
              raw: dict[str, float], rates: dict[str, float | None]) -> dict[str, Any]:
    """Per-structure raw bit-cycles and share of ``P`` (mass ``total``); shares of raw upsets
    that SEC-DED corrects or requantisation masks (both leave ``P``); expected upsets per
    inference when every structure's absolute ``rates`` (per bit and cycle) is known."""
    cycles: dict[str, float] = {}
    mass: dict[str, float] = {}
    masked = 0.0
    for se in chosen:
        for s, v in se.bit_cycles(nbits).items():
            cycles[s] = cycles.get(s, 0.0) + v
        m = float(se.bit_map(nbits).sum())
        for s, ts in se.word.items():
            mass[s] = mass.get(s, 0.0) + weights.get(s, 0.0) * nbits * sum(t.mass for t in ts)
        for s, ts in se.acc.items():
            am = weights.get(s, 0.0) * sum(t.mass for t in ts)
            mass[s] = mass.get(s, 0.0) + am * m
            masked += am * se.masked_bits()
    rawsum = sum(raw.get(s, 0.0) * v for s, v in cycles.items())
    corrected = sum(raw.get(s, 0.0) * v for s, v in cycles.items() if weights.get(s, 0.0) == 0)
    known = all(rates.get(s) is not None for s in cycles)
    upsets = float(sum(rates[s] * v for s, v in cycles.items())) if known else None  # type: ignore[operator]
    return {"structures": {s: {"bit_cycles": cycles[s], "weight": weights.get(s, 0.0),
                               "share": mass.get(s, 0.0) / total} for s in cycles},
            "corrected_share": corrected / rawsum if rawsum > 0 else 0.0,
            "masked_share": masked / (total + masked) if total + masked > 0 else 0.0,
            "upsets_per_inference": upsets}
