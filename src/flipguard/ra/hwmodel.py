"""The interface of an exposure model and the two simple ones.

* ``uniform`` - every stored bit equally likely (what fault injectors usually assume);
* ``memory`` - layers run one after another, each taking ``ceil(MACs / macs_per_cycle)``
  cycles; weights are resident for the whole inference, an activation from the end of its
  producer until the end of its last consumer (the network output until the host has read it).

The systolic model is :mod:`flipguard.ra.systolic`; :func:`flipguard.ra.exposure.
parse_hardware` picks one by name.

>>> import torch
>>> from flipguard.ra.graph import analyse
>>> g = analyse(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.zeros(1, 4))
>>> MemoryModel().timeline(g)[1]
2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from flipguard.faults import NumberFormat
from flipguard.ra.distribution import Term
from flipguard.ra.graph import Layer, LayerGraph
from flipguard.ra.structures import SiteExposure

__all__ = ["RA_TARGETS", "HardwareModel", "Key", "MemoryModel", "UniformModel", "tensor_shape"]

RA_TARGETS = ("weight", "bias", "activation")
Key = tuple[str, str]


class HardwareModel:
    """Interface of an exposure model: ``exposure(graph, fmt)`` gives, per ``(target,
    layer)``, the bit-cycles of every element per storage structure; ``structure_weights``
    the relative upset rate of each structure. Simple models implement ``terms(graph, fmt)``
    (per-element live cycles of each bit, as :class:`Term` s) and hold everything in one
    structure, ``"memory"``."""

    name = ""
    spec = ""

    def terms(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, list[Term]]:
        raise NotImplementedError  # pragma: no cover

    def exposure(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, SiteExposure]:
        return {k: SiteExposure({"memory": ts}) for k, ts in self.terms(graph, fmt).items()}

    def structure_weights(self, raw: bool = False) -> dict[str, float]:
        """Relative per-bit-cycle upset weight per structure (``raw``: before ECC)."""
        return {"memory": 1.0}

    def upset_rate(self, structure: str) -> float | None:
        """Absolute upset probability per bit and cycle, when the model knows it."""
        return None

    def config(self) -> dict[str, Any]:
        return {}

    def info(self, graph: LayerGraph, fmt: NumberFormat | None = None) -> dict[str, Any]:
        return {}


def tensor_shape(layer: Layer, target: str) -> tuple[int, ...] | None:
    """Per-sample shape of ``target`` (weight | bias | activation) of ``layer``; None if absent."""
    if target == "activation":
        return layer.out_shape
    t = getattr(layer.module, target, None)
    return tuple(t.shape) if isinstance(t, Tensor) else None


class UniformModel(HardwareModel):
    """Every stored bit equally likely."""

    name = spec = "uniform"

    def terms(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, list[Term]]:
        out: dict[Key, list[Term]] = {}
        for layer in graph.layers:
            for target in RA_TARGETS:
                shape = tensor_shape(layer, target)
                if shape is not None:
                    out[(target, layer.name)] = [Term.const(shape, 1.0)]
        return out


@dataclass
class MemoryModel(HardwareModel):
    """Residency from a per-layer timing model (see module docstring)."""

    macs_per_cycle: float = 256.0
    words_per_cycle: float = 16.0
    name = spec = "memory"

    def timeline(self, graph: LayerGraph) -> tuple[np.ndarray, float]:
        """End cycle of every layer and the total (compute + reading out the output)."""
        dur = np.array([math.ceil(ly.macs / self.macs_per_cycle) for ly in graph.layers], float)
        ends = np.cumsum(dur)
        return ends, float(ends[-1] + math.ceil(graph.output_numel / self.words_per_cycle))

    def terms(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, list[Term]]:
        ends, total = self.timeline(graph)
        end_of = np.append(ends, total)
        out: dict[Key, list[Term]] = {}
        for i, layer in enumerate(graph.layers):
            for target in ("weight", "bias"):
                shape = tensor_shape(layer, target)
                if shape is not None:
                    out[(target, layer.name)] = [Term.const(shape, total)]
            last = max((end_of[u.consumer] for u in layer.uses), default=ends[i])
            out[("activation", layer.name)] = [Term.const(layer.out_shape, last - ends[i])]
        return out

    def config(self) -> dict[str, Any]:
        return {"macs_per_cycle": self.macs_per_cycle, "words_per_cycle": self.words_per_cycle}

    def info(self, graph: LayerGraph, fmt: NumberFormat | None = None) -> dict[str, Any]:
        return {"cycles": self.timeline(graph)[1]}
