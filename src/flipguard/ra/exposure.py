"""Exposure models: the probability that a transient fault hits each site of a network.

A site's probability is proportional to how long its bit holds live data (written, and read
again later) on the accelerator: ``bits x residency``. Models:

* ``uniform`` - every stored bit equally likely (what fault injectors usually assume);
* ``memory`` - layers run one after another, each taking ``ceil(MACs / macs_per_cycle)``
  cycles; weights are resident for the whole inference, an activation from the end of its
  producer until the end of its last consumer (the network output until the host has read it);
* ``systolic[:FILE]`` - an R x C systolic array with per-structure residency and upset rates
  (PE flip-flops, SRAM buffers of finite capacity, DRAM; :mod:`flipguard.ra.systolic`).

A model reports per tensor the bit-cycles of each element in each storage structure
(:class:`~flipguard.ra.structures.SiteExposure`); ``P`` weights them by the structures'
relative upset rates (0 where SEC-DED corrects a single upset) and maps accumulator bits of
partial sums onto output bits (docs/exposure-models.md).

Sites are weights/biases of Conv/ConvTranspose/Linear layers and their outputs (activation
index = flat index in one sample's output, as in :class:`flipguard.faults.Fault`). The layer
structure is :func:`flipguard.ra.graph.analyse`; the model interface and the simple models
are in :mod:`flipguard.ra.hwmodel`, the systolic one in :mod:`flipguard.ra.systolic`.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> p = build_exposure(net, torch.zeros(1, 4), "memory", targets=("weight", "activation"))
>>> sorted(round(v, 3) for v in p.shares().values())
[0.085, 0.915]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults import get_format
from flipguard.ra.distribution import SiteDistribution
from flipguard.ra.graph import GEMM_TYPES, Layer, LayerGraph, Use, analyse
from flipguard.ra.hwmodel import (
    RA_TARGETS,
    HardwareModel,
    MemoryModel,
    UniformModel,
    tensor_shape,
)
from flipguard.ra.structures import breakdown
from flipguard.ra.systolic import SystolicModel, load_systolic

__all__ = ["GEMM_TYPES", "Use", "Layer", "LayerGraph", "analyse", "HardwareModel",
           "UniformModel", "MemoryModel", "parse_hardware", "build_exposure", "RA_TARGETS"]


def parse_hardware(spec: str | HardwareModel) -> HardwareModel:
    """``"uniform"`` | ``"memory"`` | ``"systolic"`` | ``"systolic:FILE.toml"``.

    >>> parse_hardware("systolic").config()["array"]["rows"]
    16
    """
    if isinstance(spec, HardwareModel):
        return spec
    text = str(spec).strip()
    name, sep, arg = text.partition(":")
    if name == "uniform" and not sep:
        return UniformModel()
    if name == "memory" and not sep:
        return MemoryModel()
    if name == "systolic":
        return SystolicModel(load_systolic(arg or None))
    raise ConfigError(f"--hardware: expected uniform, memory, systolic or systolic:FILE.toml, "
                      f"got {text!r}")


def build_exposure(model: nn.Module, example_input: Tensor,
                   hardware: str | HardwareModel = "uniform",
                   targets: Iterable[str] = ("weight", "activation"), fmt: str = "fp32",
                   layers: Sequence[str] | None = None,
                   graph: LayerGraph | None = None) -> SiteDistribution:
    """Distribution ``P`` over the sites of ``targets`` under a hardware exposure model.

    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> build_exposure(net, torch.zeros(1, 3), "uniform", targets=("weight",)).total
    192.0
    """
    targets = tuple(targets)
    bad = [t for t in targets if t not in RA_TARGETS]
    if bad or not targets:
        raise ConfigError(f"--targets: expected items of {', '.join(RA_TARGETS)}, "
                          f"got {bad[0] if bad else 'nothing'!r}")
    hw = parse_hardware(hardware)
    graph = graph if graph is not None else analyse(model, example_input)
    if layers is not None:
        names = {ly.name for ly in graph.layers}
        for name in layers:
            if name not in names:
                raise ConfigError(f"--layers: unknown layer {name!r}; valid: "
                                  f"{', '.join(sorted(names))}")
    number_format = get_format(fmt)
    nbits = number_format.bits
    exposures = hw.exposure(graph, number_format)
    weights = hw.structure_weights()
    blocks, chosen = [], []
    for layer in graph.layers:
        if layers is not None and layer.name not in layers:
            continue
        for target in targets:
            key = (target, layer.name)
            shape = tensor_shape(layer, target)
            if shape is not None and key in exposures:
                blocks.append(exposures[key].block(target, layer.name, shape, nbits, weights))
                chosen.append(exposures[key])
    info = {"hardware": hw.spec, "config": hw.config(), **hw.info(graph, number_format),
            "graph": graph.method}
    p = SiteDistribution(blocks, name=hw.spec, info=info)
    rates = {s: hw.upset_rate(s) for se in chosen for s in {**se.word, **se.acc}}
    info.update(breakdown(chosen, nbits, p.total, hw.structure_weights(),
                          hw.structure_weights(raw=True), rates))
    return p
