"""The GEMM structure of a network, as exposure models see it: every Conv/ConvTranspose/Linear
layer lowered to GEMMs, in execution order, with the layers that read its output.

The producer/consumer structure comes from ``torch.fx`` (forward hooks in call order when the
model cannot be traced): a consumer is the next Conv/Linear layer reached through any ops.
The trace stops only at GEMM layers and torch.nn leaves — unlike
:class:`flipguard.layers.LayerTracer`, it looks inside a user module that owns parameters
(a ``x.flip(-1) * self.scale`` there changes the layout an exposure model must know).

>>> import torch
>>> g = analyse(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
...                                 torch.nn.Linear(3, 2)), torch.zeros(1, 4))
>>> [(ly.name, ly.M, ly.K, [u.consumer for u in ly.uses]) for ly in g.layers]
[('0', 3, 4, [1]), ('2', 2, 3, [2])]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from flipguard.errors import ConfigError
from flipguard.layers import eval_mode, forward_hooks

__all__ = ["GEMM_TYPES", "Layer", "LayerGraph", "Use", "analyse"]

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
GEMM_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONVT, nn.Linear)
_PERMUTING = {"permute", "transpose", "t", "flip", "roll", "movedim", "swapaxes", "rot90",
              "swapdims", "fliplr", "flipud"}
_STRUCTURAL = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"}


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


class _GemmTracer(fx.Tracer):
    """Leaves: GEMM layers and torch.nn leaves; every other module is traced through."""

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
    graph = _GemmTracer().trace(model)
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

    def record(name: str, mod: nn.Module, inp: tuple, out: Any) -> None:
        calls.append((name, mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:])))

    gemms = {n: m for n, m in model.named_modules() if isinstance(m, GEMM_TYPES)}
    with forward_hooks(gemms, record), torch.no_grad():
        y = model(x)
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
    by_name = {ly.name: ly for ly in graph.layers}

    def record(name: str, _m: nn.Module, inp: tuple, out: Any) -> None:
        layer = by_name[name]
        if isinstance(inp[0], Tensor) and isinstance(out, Tensor):
            layer.in_amax = max(layer.in_amax, float(inp[0].detach().abs().max()))
            layer.out_amax = max(layer.out_amax, float(out.detach().abs().max()))

    hooked = {n: mods[n] for n in by_name if n in mods}
    with forward_hooks(hooked, record), torch.no_grad():
        model(x)


def analyse(model: nn.Module, example_input: Tensor) -> LayerGraph:
    """GEMM layers of ``model`` in execution order with shapes and consumers, from one
    sample of ``example_input`` (torch.fx; forward hooks in call order as a fallback).

    >>> g = analyse(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), torch.zeros(1, 1, 5, 5))
    >>> g.layers[0].M, g.layers[0].K, g.layers[0].N
    (2, 9, 9)
    """
    x = example_input[:1]
    with eval_mode(model):
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
    if not graph.layers:
        raise ConfigError("model: no Conv/ConvTranspose/Linear layer found")
    return graph
