"""Capacity-respecting buffer residency: what of the live data sits on chip, what in DRAM.

The activation buffer holds layer outputs from the moment they are written (a layer's output
blocks drain out of the accumulator while the layer runs) until their last reader ends. At
every interval (one layer, or the host reading the network output) the live tensors share
the capacity **max-min fairly** (water-filling): tensors smaller than the level stay whole,
the others get an equal slice — only a tile of a spilled tensor is on chip at a time, the
rest of it is in DRAM. Occupancy never exceeds the capacity.

>>> water_fill(np.array([1.0, 4.0, 4.0]), 5.0).tolist()  # level 2: small one stays whole
[1.0, 0.5, 0.5]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["water_fill", "ActivationPlacement", "place_activations"]


def water_fill(sizes: np.ndarray, capacity: float) -> np.ndarray:
    """On-chip fraction of each of the data sets ``sizes`` (bits) that are live together in
    a buffer of ``capacity`` bits: ``min(size, level) / size`` with ``sum min(size, level) =
    capacity`` (all 1 when everything fits)."""
    s = np.asarray(sizes, dtype=np.float64)
    out = np.ones_like(s)
    if s.size == 0 or s.sum() <= capacity:
        return out
    if capacity <= 0:
        return np.zeros_like(s)
    order = np.sort(s)
    before = np.concatenate([[0.0], np.cumsum(order)[:-1]])
    n_rest = s.size - np.arange(s.size)
    fits = before + order * n_rest >= capacity
    i = int(np.argmax(fits))
    level = (capacity - before[i]) / n_rest[i]
    pos = s > 0
    out[pos] = np.minimum(s[pos], level) / s[pos]
    return out


@dataclass
class ActivationPlacement:
    """Per tensor ``i``: cycles on chip / in DRAM after its producer ends, and the on-chip
    fraction during its producer (``during``); per interval: occupancy (bits) and duration."""

    on_chip: np.ndarray
    dram: np.ndarray
    during: np.ndarray
    occupancy: np.ndarray
    durations: np.ndarray
    capacity: float
    live: list[list[int]] = field(default_factory=list)


def place_activations(durations: np.ndarray, last: list[int | None], bits: np.ndarray,
                      capacity: float) -> ActivationPlacement:
    """Water-fill the activation buffer interval by interval.

    ``durations[j]``: cycles of interval ``j`` (layers, then the host readout);
    ``last[i]``: the last interval that reads tensor ``i`` (None: never read); ``bits[i]``:
    its size. Tensor ``i`` is live from interval ``i`` (its producer, counted at its full
    size: an upper bound while its blocks drain in) to ``last[i]``.

    >>> pl = place_activations(np.array([10.0, 10.0]), [1, None], np.array([8.0, 2.0]), 4.0)
    >>> pl.during.tolist(), pl.on_chip.tolist(), pl.dram.tolist()
    ([0.5, 1.0], [5.0, 0.0], [5.0, 0.0])
    """
    n, nint = len(last), len(durations)
    on_chip, dram, during = np.zeros(n), np.zeros(n), np.ones(n)
    occ, live_sets = np.zeros(nint), []
    for j in range(nint):
        live = [i for i in range(n) if last[i] is not None and i <= j <= last[i]]
        live_sets.append(live)
        if not live:
            continue
        f = water_fill(bits[live], capacity)
        occ[j] = float(np.sum(bits[live] * f))
        for i, fi in zip(live, f, strict=True):
            if i == j:
                during[i] = fi
            else:
                on_chip[i] += durations[j] * fi
                dram[i] += durations[j] * (1.0 - fi)
    return ActivationPlacement(on_chip, dram, during, occ, np.asarray(durations, float),
                               capacity, live_sets)
