"""Faults in chunks: single-layer runs in a fair order (every prefix a uniform subsample of
each stratum's plan), and one chunk executed by an engine.

>>> first_faults([], 3)
[]
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

from flipguard.campaign.planner import PlannedFault
from flipguard.errors import ConfigError

__all__ = ["Chunk", "chunks_of", "execute_chunk", "first_faults"]

Chunk = tuple[list[int], list[dict[str, Any]], float]
"""Fault ids, their outcome dicts and the seconds the chunk took in its process."""
"""Executed chunk: fault ids and their ``Outcome.to_dict()`` rows."""


def chunks_of(faults: Sequence[PlannedFault], chunk: int = 32, seed: int = 0
              ) -> list[list[PlannedFault]]:
    """Split faults into single-layer runs of ``chunk`` in an order that makes any stopping
    point a fair partial campaign: within a layer the faults follow a pseudo-random
    permutation keyed by ``(seed, fault_id)`` (so every prefix is a uniform subsample of the
    stratum's plan, and the order of the remaining faults is the same after a resume), and
    the chunks go round-robin over the layers (every layer advances at the same pace)."""
    if chunk < 1:
        raise ConfigError(f"chunk: expected >= 1, got {chunk}")
    runs = []
    for g, members in enumerate(_permuted(faults, seed)):
        runs += [((i // chunk, g), members[i:i + chunk]) for i in range(0, len(members), chunk)]
    return [c for _, c in sorted(runs, key=lambda r: r[0])]


def first_faults(faults: Sequence[PlannedFault], k: int, seed: int = 0) -> list[PlannedFault]:
    """The ``k`` faults a limited run executes: one per layer in turn, each layer's in the
    permuted order of :func:`chunks_of` (every layer advances, a uniform subsample of each)."""
    groups = _permuted(faults, seed)
    order = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    return order[:k]


def _permuted(faults: Sequence[PlannedFault], seed: int) -> list[list[PlannedFault]]:
    groups: dict[tuple[str, str], list[PlannedFault]] = {}
    for pf in sorted(faults, key=lambda f: f.fault_id):
        groups.setdefault((pf.fault.layer, pf.fault.target), []).append(pf)
    return [sorted(g, key=lambda pf: _order_key(seed, pf.fault_id)) for g in groups.values()]


def _order_key(seed: int, fault_id: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{fault_id}".encode(), digest_size=8).digest()


def execute_chunk(engine: Any, chunk: Sequence[PlannedFault]) -> Chunk:
    """Run one chunk with ``engine``: fault ids, outcome dicts and the seconds it took."""
    t0 = time.perf_counter()
    outcomes = engine.run([pf.fault for pf in chunk])
    return ([pf.fault_id for pf in chunk], [o.to_dict() for o in outcomes],
            time.perf_counter() - t0)


