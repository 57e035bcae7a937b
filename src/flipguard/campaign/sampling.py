"""Seeded uniform draws within a campaign stratum (without replacement, top-ups exclude
earlier draws). Each stratum has its own generator, so strata never share random numbers.

>>> import torch
>>> from flipguard.campaign.planner import PlanConfig, make_plan
>>> plan = make_plan(torch.nn.Linear(3, 2), PlanConfig(strata="layer", error=0.3))
>>> a = draw_faults(plan.space, plan.strata[0], 3, seed=0)
>>> a == draw_faults(plan.space, plan.strata[0], 3, seed=0), len({k for k, _, _ in a})
(True, 3)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from flipguard.campaign.conventions import effective_kinds
from flipguard.errors import ConfigError
from flipguard.faults import Fault, SiteSpace

if TYPE_CHECKING:
    from flipguard.campaign.planner import PlannedStratum

__all__ = ["draw_faults", "stratum_rng"]


def stratum_rng(seed: int, key: str, round_: int = 0) -> np.random.Generator:
    """Generator of one stratum: ``SeedSequence([seed, round, *sha256(key) words])``."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest(), dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(round_),
                                                         *map(int, words)]))


def _choose(rng: np.random.Generator, total: int, n: int, exclude: np.ndarray) -> np.ndarray:
    excl = np.unique(exclude.astype(np.int64))
    left = total - len(excl)
    if not 0 <= n <= left:
        raise ConfigError(f"n: expected 0..{left} faults left in the stratum, got {n}")
    r = rng.choice(left, size=n, replace=False).astype(np.int64)
    if len(excl):  # r-th value not excluded
        r = r + np.searchsorted(excl - np.arange(len(excl)), r, side="right")
    return np.sort(r)


def draw_faults(space: SiteSpace, s: PlannedStratum, n: int, seed: int,
                kinds: Sequence[str] = ("flip",), round_: int = 0,
                exclude: Iterable[int] = ()) -> list[tuple[int, Fault, int]]:
    """``n`` distinct faults ``(k, Fault, kernel)`` of stratum ``s`` drawn uniformly without
    replacement, skipping stratum-local numbers ``exclude`` (for top-ups). An ``effective``
    stratum numbers its sites and gives each the stuck value that changes its stored bit."""
    K = 1 if s.effective else len(kinds)
    ks = _choose(stratum_rng(seed, s.key, round_), s.N, n,
                 np.fromiter(exclude, dtype=np.int64))
    if not len(ks):
        return []
    idx, bits = space.decode(s.layer, ks // K, s.bit, s.kernel, s.bits, s.target)
    kern = np.atleast_1d(space.layer(s.layer, s.target).kernel_of(idx))
    kind = (effective_kinds(space, s.layer, s.target, idx, bits) if s.effective
            else [kinds[k % K] for k in ks.tolist()])
    return [(int(k), Fault(s.target, s.layer, int(i), (int(b),), kd), int(c))
            for k, i, b, c, kd in zip(ks.tolist(), idx.tolist(), bits.tolist(), kern.tolist(),
                                      kind, strict=True)]
