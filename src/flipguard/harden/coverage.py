"""Which fault locations each protection covers, and what it costs on the read path.

Every weight mechanism of :mod:`~flipguard.harden.mechanisms` acts on the *read path* of a
stored word: it covers faults in **storage** (the word in memory up to the read port) only,
not in the **datapath** (multipliers, adders, partial sums) nor in **registers** (PE operand
registers, pipeline latches) that hold the word after the read. Activation clamping bounds
the values entering a layer, so it also bounds faults of the producing layer's datapath.
Memory bits are :meth:`Protection.cost_bits`; the read-path cost is logic paid on every load.

>>> COVERAGE["invariant"].locations, COVERAGE["invariant"].per_load
(('storage',), 'one AND + one OR with constants (no extra bits read per layer)')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["COVERAGE", "LOCATIONS", "Coverage"]

LOCATIONS = ("storage", "datapath", "registers")
"""Fault locations: ``storage`` (stored words in weight/activation memory: SRAM buffers,
DRAM), ``datapath`` (arithmetic units and partial sums), ``registers`` (PE operand registers,
pipeline latches)."""


@dataclass(frozen=True)
class Coverage:
    """What a scheme protects: the ``target`` tensors ("weight" or "activation"), the fault
    ``locations`` it covers (items of ``LOCATIONS``), its ``effect`` on a covered fault
    ("corrects", "detects" or "bounds" the value) and the logic on the ``read_path`` at every
    load of a protected word (``per_load``: what one load costs, in words)."""

    scheme: str
    target: str
    locations: tuple[str, ...]
    effect: str
    read_path: str
    per_load: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["locations"] = list(self.locations)
        d["not_covered"] = [loc for loc in LOCATIONS if loc not in self.locations]
        return d


COVERAGE: dict[str, Coverage] = {c.scheme: c for c in (
    Coverage("tmr", "weight", ("storage",), "corrects",
             "two extra copies of the protected bits and a bitwise 2-of-3 majority vote",
             "2 x |B| extra bits read + one 3-input majority gate per protected bit"),
    Coverage("parity", "weight", ("storage",), "detects",
             "a parity (XOR) tree over the group's bits compared with the stored parity bit; "
             "on a mismatch the word reads as 0 (zero) or is reloaded from a clean copy "
             "(reload)", "1 extra bit read + a |G|-input XOR tree and a compare"),
    Coverage("ecc", "weight", ("storage",), "corrects",
             "a SEC-DED decoder: syndrome XOR trees over data + check bits, a syndrome decoder "
             "and a correcting XOR; double errors detected (zero | reload)",
             "r + 1 extra bits read (7 for 32-bit words) + one SEC-DED decode"),
    Coverage("range", "weight", ("storage",), "bounds",
             "a NaN test, 2 comparisons with the group's [lo, hi] and a select (clamp)",
             "2 comparisons + a select"),
    Coverage("invariant", "weight", ("storage",), "corrects",
             "a mask: (w AND NOT m) OR v with the group's constant mask m and values v",
             "one AND + one OR with constants (no extra bits read per layer)"),
    Coverage("act", "activation", ("storage", "datapath"), "bounds",
             "a NaN test, 2 comparisons and a select on every activation entering a clamped "
             "layer (its bounds from training data); bounds faults of the stored activation "
             "and of the producing layer's datapath, not of registers after the clamp",
             "2 comparisons + a select per activation element loaded"),
)}
