"""Data-aware priors of campaign strata, computed from the weights' bits without running the
model (see docs/campaigns.md, "Priors").

>>> net = torch.nn.Linear(4, 2, bias=False)
>>> from flipguard.campaign.planner import PlanConfig, make_plan
>>> s = make_plan(net, PlanConfig(strata="layer,bit", p="data-aware")).strata[0]
>>> s.bit, s.p  # flipping the mantissa LSB never moves a weight by max |w|
(0, 0.01)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from flipguard.faults import SiteSpace, apply_bits

if TYPE_CHECKING:
    from flipguard.campaign.planner import PlannedStratum

__all__ = ["P_FLOOR", "data_aware_p"]

P_FLOOR = 0.01
"""Data-aware priors are clamped to [P_FLOOR, 1 - P_FLOOR] (see docs/campaigns.md)."""


def _critical_counts(space: SiteSpace, layer: str, target: str, kinds: Sequence[str],
                     cache: dict) -> np.ndarray:
    """counts[kind, bit, kernel]: elements whose fault moves the stored value by more than
    the tensor's largest magnitude (or makes it non-finite) — the data-aware proxy."""
    key = (layer, target)
    if key in cache:
        return cache[key]
    ls = space.layer(layer, target)
    tensor = getattr(space.modules[layer], target).detach().float().cpu()
    fmt = space.bound_format(layer, target, tensor)
    base = fmt.decode(fmt.encode(tensor))
    limit = base.abs().max().item()
    kern = np.asarray(ls.kernel_of(np.arange(ls.numel)), dtype=np.int64)
    counts = np.zeros((len(kinds), fmt.bits, ls.n_kernels))
    with torch.no_grad():
        for ki, kind in enumerate(kinds):
            for b in range(fmt.bits):
                faulty = apply_bits(tensor, 1 << b, kind, fmt)
                crit = ~torch.isfinite(faulty) | ((faulty - base).abs() > limit)
                counts[ki, b] = np.bincount(kern, weights=crit.reshape(-1).numpy(),
                                            minlength=ls.n_kernels)
    cache[key] = counts
    return counts


def data_aware_p(space: SiteSpace, s: PlannedStratum, kinds: Sequence[str],
                 cache: dict | None = None) -> float:
    """Prior of stratum ``s`` from the weights' bits: the fraction of its faults that move
    a weight by more than the layer's largest magnitude (or to inf/NaN), clamped to
    ``[P_FLOOR, 1 - P_FLOOR]``."""
    counts = _critical_counts(space, s.layer, s.target, kinds, {} if cache is None else cache)
    bits = space.resolve_bits(s.bit, s.bits).tolist()
    sub = counts[:, bits, :] if s.kernel is None else counts[:, bits, s.kernel:s.kernel + 1]
    p = float(sub.sum()) / max(s.N, 1)
    return min(max(p, P_FLOOR), 1.0 - P_FLOOR)
