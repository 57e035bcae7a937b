"""What the protections in use cover and cost: per scheme, the fault locations it covers,
its read-path logic and cost per load (:data:`~flipguard.harden.coverage.COVERAGE`), next to
its memory bits and the words it protects.

>>> from torch import nn
>>> from flipguard.harden.mechanisms import Protection
>>> prots = [Protection("parity", "0", bits=(30,)), Protection("parity", "1", bits=(30,))]
>>> [(c["scheme"], c["protections"]) for c in coverage_summary(
...     nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), prots)]
[('parity', 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from flipguard.faults import get_format
from flipguard.harden.coverage import COVERAGE
from flipguard.harden.mechanisms import Protection
from flipguard.harden.planner import tensor_words

__all__ = ["coverage_summary"]


def coverage_summary(model: nn.Module, protections: Sequence[Protection], fmt: str = "fp32",
                     clamps: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per scheme in use: the locations covered / not covered, effect, read-path logic and
    cost per load (``COVERAGE``), next to its memory bits and the words it protects (each
    load of one of them pays the read-path cost); ``clamps``: the activation clamps
    (``{"layers": {...}, "cost_bits": n}``) when in use.

    >>> net = nn.Sequential(nn.Linear(4, 3))
    >>> [(c["scheme"], c["memory_bits"], c["protected_words"], c["locations"])
    ...  for c in coverage_summary(net, [Protection("ecc", "0")])]
    [('ecc', 84, 12, ['storage'])]
    """
    fmt_ = get_format(fmt)
    out: dict[str, dict[str, Any]] = {}
    for p in protections:
        _, ids, bound = tensor_words(model, p.layer, p.target, fmt_)
        n = int(ids.numel() if p.kernel is None else (ids == p.kernel).sum())
        d = out.setdefault(p.scheme, {**COVERAGE[p.scheme].to_dict(), "memory_bits": 0,
                                      "protected_words": 0, "protections": 0})
        d["memory_bits"] += p.cost_bits(n, bound.bits)
        d["protected_words"] += n
        d["protections"] += 1
    if clamps:
        out["act"] = {**COVERAGE["act"].to_dict(), "memory_bits": int(clamps["cost_bits"]),
                      "protected_words": None, "protections": len(clamps["layers"])}
    return list(out.values())
