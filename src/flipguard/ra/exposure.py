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
index = flat index in one sample's output, as in :class:`flipguard.faults.Fault`). The
producer/consumer structure comes from ``torch.fx`` (forward hooks in call order when the
model cannot be traced): a consumer is the next Conv/Linear layer reached through any ops.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> p = build_exposure(net, torch.zeros(1, 4), "memory", targets=("weight", "activation"))
>>> sorted(round(v, 3) for v in p.shares().values())
[0.085, 0.915]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from flipguard.errors import ConfigError
from flipguard.faults import NumberFormat, get_format
from flipguard.ra.distribution import SiteDistribution, Term
from flipguard.ra.structures import SiteExposure, breakdown

__all__ = ["GEMM_TYPES", "Use", "Layer", "LayerGraph", "analyse", "HardwareModel",
           "UniformModel", "MemoryModel", "parse_hardware", "build_exposure", "RA_TARGETS"]

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
GEMM_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONVT, nn.Linear)
RA_TARGETS = ("weight", "bias", "activation")
_PERMUTING = {"permute", "transpose", "t", "flip", "roll", "movedim", "swapaxes", "rot90",
              "swapdims", "fliplr", "flipud"}
_STRUCTURAL = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}
Key = tuple[str, str]


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return ""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


@dataclass
class Use:
    """A read of a layer's output: by layer ``consumer`` (``len(layers)``: the host reads the
    network output). ``exact``: the consumer's input holds the producer's elements in their
    own layout (only element-wise ops and views in between); ``ratio``: input numel / output
    numel of the producer (per sample); ``reads`` False: an op combining it with another
    tensor (e.g. a residual add) fused into layer ``consumer``'s output stage, which ends the
    value's life there without array reads."""

    consumer: int
    exact: bool
    ratio: float = 1.0
    reads: bool = True


@dataclass
class Layer:
    """A Conv/ConvTranspose/Linear layer lowered to ``groups`` GEMMs ``(M x K) @ (K x N)``
    (conv: im2col, M = out/groups, K = in/groups * kernel, N = output pixels; transposed conv:
    col2im, M = out/groups * kernel, K = in/groups, N = input pixels; linear: N = leading
    dims of one sample). Shapes are per sample; ``in_amax`` / ``out_amax``: largest
    magnitude of the layer's input / output on the analysed sample (int8 requantisation)."""

    name: str
    module: nn.Module
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    groups: int
    M: int
    K: int
    N: int
    uses: list[Use] = field(default_factory=list)
    in_amax: float = 0.0
    out_amax: float = 0.0

    @property
    def macs(self) -> int:
        return self.groups * self.M * self.K * self.N

    @property
    def weight_view(self) -> tuple[tuple[int, int], int]:
        """2-D view of the weight (C order) and which of its axes is the GEMM M axis."""
        w = self.module.weight
        if self.kind == "convT":  # (in, out/g, *k): rows = K (global), cols = M (per group)
            return (int(w.shape[0]), int(w.numel() // w.shape[0])), 1
        return (int(w.shape[0]), int(w.numel() // w.shape[0])), 0


@dataclass
class LayerGraph:
    """GEMM layers in execution order, the network output size and the analysis method."""

    layers: list[Layer]
    output_numel: int
    method: str

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise ConfigError(f"layers: unknown layer {name!r}")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, GEMM_TYPES) or super().is_leaf_module(m, qualname)


def _numel(node: Any) -> int | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None or len(shape) < 1 else math.prod(int(s) for s in shape[1:])


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["tensor_meta"].shape[1:])


def _make_layer(name: str, m: nn.Module, in_shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> Layer:
    if isinstance(m, nn.Linear):
        n = math.prod(in_shape[:-1]) if len(in_shape) > 1 else 1
        return Layer(name, m, "linear", in_shape, out_shape, 1, m.out_features, m.in_features, n)
    g, k = int(m.groups), math.prod(m.kernel_size)
    if isinstance(m, _CONVT):
        return Layer(name, m, "convT", in_shape, out_shape, g, m.out_channels // g * k,
                     m.in_channels // g, math.prod(in_shape[1:]))
    return Layer(name, m, "conv", in_shape, out_shape, g, m.out_channels // g,
                 m.in_channels // g * k, math.prod(out_shape[1:]))


def _fx_graph(model: nn.Module, x: Tensor) -> LayerGraph:
    from torch.fx.passes.shape_prop import ShapeProp

    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(x)
    mods = dict(model.named_modules())
    gemm: dict[fx.Node, int] = {}
    layers: list[Layer] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(str(node.target)), GEMM_TYPES):
            name = str(node.target)
            if name in seen:
                raise ConfigError(f"layer {name!r}: called more than once per forward pass; "
                                  f"exposure models need one call per layer")
            seen.add(name)
            gemm[node] = len(layers)
            layers.append(_make_layer(name, mods[name], _shape(node.args[0]), _shape(node)))
    last_gemm, cur_gemm = {}, 0
    for node in gm.graph.nodes:
        cur_gemm = gemm.get(node, cur_gemm)
        last_gemm[node] = cur_gemm
    for node, i in gemm.items():
        own = _numel(node)
        found: dict[tuple[int, bool], Use] = {}
        stack, visited = [(node, True)], {node}
        while stack:
            cur, exact = stack.pop()
            for u in cur.users:
                name = _op_name(u)
                data_in = [a for a in u.all_input_nodes if a.op != "get_attr"]
                if u in gemm or u.op == "output":
                    pos, reads = gemm.get(u, len(layers)), True
                    inp = _numel(u.args[0]) if u in gemm else _numel(cur)
                    ex = exact and inp == own and (u.op == "output" or u.args[0] is cur)
                elif len(data_in) > 1 and name not in _STRUCTURAL:
                    pos, reads, inp, ex = last_gemm[u], False, _numel(cur), False
                else:
                    if u not in visited:
                        visited.add(u)
                        stack.append((u, exact and _numel(u) == own and name not in _PERMUTING))
                    continue
                ratio = (inp / own) if inp and own else 1.0
                prev = found.get((pos, reads))
                found[(pos, reads)] = Use(pos, ex and (prev is None or prev.exact), ratio, reads)
        layers[i].uses = sorted(found.values(), key=lambda use: (use.consumer, use.reads))
    out_numel = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            outs = [a for a in node.all_input_nodes]
            out_numel = sum(_numel(a) or 0 for a in outs)
    return LayerGraph(layers, out_numel, "fx")


def _hook_graph(model: nn.Module, x: Tensor) -> LayerGraph:
    calls: list[tuple[str, nn.Module, tuple, tuple]] = []
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, GEMM_TYPES):
            def hook(mod, inp, out, name=name):
                calls.append((name, mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:])))
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    names = [c[0] for c in calls]
    if len(set(names)) != len(names):
        raise ConfigError("model: a layer is called more than once per forward pass")
    layers = [_make_layer(*c) for c in calls]
    for i, layer in enumerate(layers):
        own = math.prod(layer.out_shape)
        nxt = math.prod(layers[i + 1].in_shape) if i + 1 < len(layers) else own
        layer.uses = [Use(i + 1, nxt == own, nxt / own)]
    out_numel = math.prod(y.shape[1:]) if isinstance(y, Tensor) else 0
    return LayerGraph(layers, out_numel, "hooks")


def _record_amax(model: nn.Module, x: Tensor, graph: LayerGraph) -> None:
    """Largest |input| and |output| of every GEMM layer on sample ``x``."""
    mods = dict(model.named_modules())
    handles = []
    for layer in graph.layers:
        def hook(_m, inp, out, layer=layer):
            if isinstance(inp[0], Tensor) and isinstance(out, Tensor):
                layer.in_amax = max(layer.in_amax, float(inp[0].detach().abs().max()))
                layer.out_amax = max(layer.out_amax, float(out.detach().abs().max()))
        m = mods.get(layer.name, model if layer.name == "" else None)
        if m is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def analyse(model: nn.Module, example_input: Tensor) -> LayerGraph:
    """GEMM layers of ``model`` in execution order with shapes and consumers, from one
    sample of ``example_input`` (torch.fx; forward hooks in call order as a fallback).

    >>> g = analyse(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), torch.zeros(1, 1, 5, 5))
    >>> g.layers[0].M, g.layers[0].K, g.layers[0].N
    (2, 9, 9)
    """
    x = example_input[:1]
    was = model.training
    model.eval()
    try:
        try:
            with torch.no_grad():
                graph = _hook_graph(model, x) if isinstance(model, GEMM_TYPES) else _fx_graph(
                    model, x)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - untraceable models fall back to hooks
            graph = _hook_graph(model, x)
        if graph.layers:
            _record_amax(model, x, graph)
    finally:
        model.train(was)
    if not graph.layers:
        raise ConfigError("model: no Conv/ConvTranspose/Linear layer found")
    return graph


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


def _tensor_shape(layer: Layer, target: str) -> tuple[int, ...] | None:
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
                shape = _tensor_shape(layer, target)
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
                shape = _tensor_shape(layer, target)
                if shape is not None:
                    out[(target, layer.name)] = [Term.const(shape, total)]
            last = max((end_of[u.consumer] for u in layer.uses), default=ends[i])
            out[("activation", layer.name)] = [Term.const(layer.out_shape, last - ends[i])]
        return out

    def config(self) -> dict[str, Any]:
        return {"macs_per_cycle": self.macs_per_cycle, "words_per_cycle": self.words_per_cycle}

    def info(self, graph: LayerGraph, fmt: NumberFormat | None = None) -> dict[str, Any]:
        return {"cycles": self.timeline(graph)[1]}


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
        from flipguard.ra.systolic import SystolicModel, load_systolic

        return SystolicModel(load_systolic(arg or None))
    raise ConfigError(f"--hardware: expected uniform, memory, systolic or systolic:FILE.toml, "
                      f"got {text!r}")


def build_exposure(model: nn.Module, example_input: Tensor,
                   hardware: str | HardwareModel = "uniform",
                   targets: Iterable[str] = ("weight", "activation"), fmt: str = "fp32",
                   layers: Sequence[str] | None = None,
                   graph: LayerGraph | None = None) -> SiteDistribution:
    """Distribution ``P`` over the sites of ``targets`` under a hardware exposure model.

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
            shape = _tensor_shape(layer, target)
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
