"""Conventions that published sample sizes depend on: the ``t`` of the sample-size formula and
the population of a stuck-at campaign (see docs/campaigns.md, "Conventions").

* ``t="exact"`` (default): the two-sided standard-normal quantile ``Φ⁻¹(1 − α/2)``
  (1.959964 at 95 %, 2.575829 at 99 %).
* ``t="table"``: that quantile rounded to two decimals, the value printed in the tables that
  Leveugle et al. (DATE 2009) and the artifacts built on them use (1.96 at 95 %, 2.58 at 99 %;
  1.64 at 90 %, 3.29 at 99.9 %).
* ``stuck_at="all"`` (default): both stuck values of every site, including the no-op half
  (the bit already holds the stuck value; such a fault is masked by construction).
* ``stuck_at="effective"``: only the stuck-at faults that change the stored bit. Every site
  has exactly one, stuck-at-(1 − stored bit), so the population is the sites and the drawn
  fault corrupts the word exactly as a flip of that bit would.

>>> plan_t(0.99, "table"), round(plan_t(0.99), 6)
(2.58, 2.575829)
>>> sample_size(27648, 0.01, 0.99, 0.5, "nearest", "table")  # ResNet-20 conv1 (Ruospo et al.)
10389
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from flipguard.campaign.stats import leveugle_n, t_value
from flipguard.errors import ConfigError
from flipguard.faults import SiteSpace

__all__ = ["STUCK_AT", "T_CONVENTIONS", "check_stuck_at", "check_t", "effective_counts",
           "effective_kinds", "plan_t", "population_note", "sample_size"]

T_CONVENTIONS = ("exact", "table")
STUCK_AT = ("all", "effective")


def check_t(t: str) -> str:
    """Validate a t convention: ``"exact"`` or ``"table"``."""
    if t not in T_CONVENTIONS:
        raise ConfigError(f"t: expected exact or table, got {t!r}")
    return t


def check_stuck_at(population: str) -> str:
    """Validate a stuck-at population: ``"all"`` or ``"effective"``."""
    if population not in STUCK_AT:
        raise ConfigError(f"stuck-at: expected all or effective, got {population!r}")
    return population


def plan_t(confidence: float, t: str = "exact") -> float:
    """The ``t`` of the sample-size formula at ``confidence`` under convention ``t``.

    >>> plan_t(0.95, "table"), plan_t(0.90, "table")
    (1.96, 1.64)
    """
    exact = t_value(confidence)
    if check_t(t) == "exact":
        return exact
    z = round(exact, 2)
    if z <= 0.0:
        raise ConfigError(f"t: 'table' rounds t to 0.00 at confidence {confidence:g}; "
                          "use --t exact")
    return z


def sample_size(N: int, e: float, confidence: float, p: float = 0.5, rounding: str = "ceil",
                t: str = "exact") -> int:
    """Leveugle ``n`` of a population ``N`` with the ``t`` of convention ``t``.

    ``leveugle_n`` takes a confidence level and uses its exact quantile; for a table ``t`` it
    is given the level whose exact two-sided quantile is that ``t``: ``erf(t / √2)``.

    >>> sample_size(864, 0.01, 0.99, rounding="nearest", t="table"), sample_size(864, 0.01, 0.99)
    (821, 822)
    """
    if check_t(t) == "exact":
        return leveugle_n(N, e, confidence, p, rounding)
    z = plan_t(confidence, t)
    return leveugle_n(N, e, math.erf(z / math.sqrt(2.0)), p, rounding)


def population_note(fault_model: str, stuck_at: str = "all") -> str:
    """One line saying what a campaign's population counts (printed by ``campaign plan``).

    >>> population_note("stuck-at").split(":")[0]
    'population (--stuck-at all)'
    """
    if fault_model != "stuck-at":
        return "population: every bit of every target element, one flip each"
    if check_stuck_at(stuck_at) == "effective":
        return ("population (--stuck-at effective): only the stuck-at faults that change the "
                "stored bit, one per bit (stuck-at-0 on a 1, stuck-at-1 on a 0)")
    return ("population (--stuck-at all): stuck-at-0 and stuck-at-1 on every bit, including "
            "the no-op half (bit already at the stuck value, masked by construction); "
            "--stuck-at effective keeps only the faults that change the bit")


def _stored_words(space: SiteSpace, layer: str, target: str) -> np.ndarray:
    """Stored words of the layer's tensor as flat int64 (two's complement bits kept)."""
    tensor = getattr(space.modules[layer], target).detach().float().cpu()
    fmt = space.bound_format(layer, target, tensor)
    return fmt.encode(tensor).reshape(-1).to(torch.int64).numpy()


def effective_kinds(space: SiteSpace, layer: str, target: str, index: np.ndarray,
                    bits: np.ndarray) -> list[str]:
    """The effective stuck-at kind of each site ``(index, bit)``: stuck-at-0 where the stored
    bit is 1, stuck-at-1 where it is 0 (the fault that changes the bit)."""
    words = _stored_words(space, layer, target)[np.asarray(index, dtype=np.int64)]
    ones = (words >> np.asarray(bits, dtype=np.int64)) & 1
    return ["stuck-at-0" if b else "stuck-at-1" for b in ones.tolist()]


def effective_counts(space: SiteSpace, layer: str, target: str, bit_list: Sequence[int],
                     kernel: int | None, kinds: Sequence[str], cache: dict | None = None
                     ) -> tuple[tuple[int, int, int, int], ...]:
    """Population rows ``(kind index, bit, kernel, count)`` of the effective stuck-at faults
    of a stratum: the stored 1s (stuck-at-0) and 0s (stuck-at-1) per bit and kernel."""
    cache = {} if cache is None else cache
    key = ("effective", layer, target)
    if key not in cache:
        ls = space.layer(layer, target)
        words = _stored_words(space, layer, target)
        kern = np.asarray(ls.kernel_of(np.arange(ls.numel)), dtype=np.int64)
        per_kernel = np.bincount(kern, minlength=ls.n_kernels)
        ones = np.stack([np.bincount(kern, weights=(words >> b) & 1, minlength=ls.n_kernels)
                         for b in range(space.fmt.bits)]).round().astype(np.int64)
        cache[key] = (ones, per_kernel)
    ones, per_kernel = cache[key]
    k0, k1 = kinds.index("stuck-at-0"), kinds.index("stuck-at-1")
    kernels = range(len(per_kernel)) if kernel is None else (int(kernel),)
    rows = []
    for b in bit_list:
        for c in kernels:
            one = int(ones[b, c])
            rows += [(k0, int(b), c, one), (k1, int(b), c, int(per_kernel[c]) - one)]
    return tuple(r for r in rows if r[3] > 0)
