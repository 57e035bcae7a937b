"""Pareto bookkeeping: dominance, the non-dominated front and non-dominated ranks.

``a`` dominates ``b`` when it is at least as good in every objective and strictly better in
one (directions ``"maximize"`` / ``"minimize"`` per objective). Equal points do not
dominate each other, so duplicates are all on the front. The front is found by a sweep in
lexicographic order (a point can only be dominated by a point before it in that order, and
by then by a front member, by transitivity), ``O(n log n + n * |front|)``.

>>> v = [[0.9, 0.5], [0.8, 0.7], [0.7, 0.4], [0.9, 0.5]]
>>> pareto_front(v, ["maximize", "maximize"]).tolist()
[0, 1, 3]
>>> nondominated_ranks(v, ["maximize", "maximize"]).tolist()
[0, 0, 1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flipguard.errors import ConfigError

__all__ = ["dominates", "nondominated_ranks", "pareto_front", "to_minimise"]


def to_minimise(values: Sequence[Sequence[float]] | np.ndarray,
                directions: Sequence[str]) -> np.ndarray:
    """``values`` (n, k) as float with maximised columns negated (every column minimised)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1 and v.size == 0:
        v = v.reshape(0, len(directions))
    if v.ndim != 2 or v.shape[1] != len(directions):
        raise ConfigError(f"values: expected shape (n, {len(directions)}), got {v.shape}")
    if np.isnan(v).any():
        raise ConfigError("values: NaN objective value")
    sign = []
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise ConfigError(f"directions: expected 'maximize' or 'minimize', got {d!r}")
        sign.append(-1.0 if d == "maximize" else 1.0)
    return v * np.asarray(sign)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether ``a`` Pareto-dominates ``b``.

    >>> up = ["maximize", "maximize"]
    >>> dominates([1, 2], [1, 1], up), dominates([1, 1], [1, 1], up)
    (True, False)
    """
    m = to_minimise([a, b], directions)
    return bool((m[0] <= m[1]).all() and (m[0] < m[1]).any())


def pareto_front(values: Sequence[Sequence[float]] | np.ndarray,
                 directions: Sequence[str]) -> np.ndarray:
    """Indices (sorted) of the non-dominated points of ``values`` (n, k)."""
    m = to_minimise(values, directions)
    if m.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(m.T[::-1])
    front: list[int] = []
    for i in order:
        if front:
            f = m[front]
            if ((f <= m[i]).all(axis=1) & (f < m[i]).any(axis=1)).any():
                continue
        front.append(int(i))
    return np.sort(np.asarray(front, dtype=np.int64))


def nondominated_ranks(values: Sequence[Sequence[float]] | np.ndarray,
                       directions: Sequence[str]) -> np.ndarray:
    """Rank of every point: 0 on the front, 1 on the front of the rest, ..."""
    m = to_minimise(values, directions)
    ranks = np.full(m.shape[0], -1, dtype=np.int64)
    left = np.arange(m.shape[0])
    r = 0
    while left.size:
        f = left[pareto_front(m[left], ["minimize"] * m.shape[1])]
        ranks[f] = r
        left = np.setdiff1d(left, f)
        r += 1
    return ranks
