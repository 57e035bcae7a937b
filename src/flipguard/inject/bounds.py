"""Sound bounds on how far a perturbation of one layer's output can move the model output.

:func:`propagate` carries two non-negative radius tensors through the rest of a traced
program, centred on the golden values of every node: ``F`` (the perturbation injected at the
start node, scaled by ``t``) and ``R`` (float rounding of the faulty computation, which a
fault-free run does not have). Every handler is positive-linear in ``F`` once the slopes of
the activations are fixed, and the slopes are chosen from ``F + R`` at the cap ``t``; so for
any perturbation up to ``t`` times the injected one the output moves by at most ``(s / t) *
F + R`` elementwise (interval bound propagation with golden centres, ReLU-state aware).
Rounding (both the golden and the faulty run round): ``"worst-case"`` uses that a
length-``n`` dot product computed in floating point is within ``gamma_n = n u / (1 - n u)``
of the exact one (any summation order), times ``KAPPA`` for transformed convolution
algorithms; that is a proof, but through a deep network it outgrows any decision margin.
``"ulp"`` (the default) assumes every computed value within ``ULPS`` units of roundoff of
exact, an assumption the soundness tests check by simulation rather than a proof.

Unsupported operations raise :class:`Unsupported`; callers then certify nothing upstream.

>>> from flipguard.inject.graph import trace
>>> prog = trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
>>> golden = golden_values(prog, torch.ones(3, 2))
>>> F, R = propagate(prog, golden, prog.calls["0"], torch.full((3, 2), 1e-3))
>>> tuple(F.shape), bool((F >= 0).all())
((3, 1), True)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor, fx, nn

from flipguard.inject.graph import Program

__all__ = ["KAPPA", "ROUNDING", "ULPS", "Unsupported", "golden_values", "layer_rounding",
           "propagate", "rounding_unit", "ulp_rounding"]

KAPPA = 4.0
"""Safety factor on the textbook dot-product rounding bound (Winograd / FFT convolutions)."""
ULPS = 16.0
"""Units of roundoff per computed value in the ``"ulp"`` rounding model."""
ROUNDING = ("ulp", "worst-case")

_VIEW_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze",
                 "contiguous", "unflatten", "__getitem__", "view_as", "reshape_as"}
_VIEW_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
               torch.unsqueeze, operator.getitem}
_POOL_FUNCS = {nnf.max_pool1d, nnf.max_pool2d, nnf.max_pool3d, nnf.avg_pool1d, nnf.avg_pool2d,
               nnf.avg_pool3d, nnf.adaptive_avg_pool1d, nnf.adaptive_avg_pool2d,
               nnf.adaptive_max_pool2d, torch.max_pool2d, torch.avg_pool1d}
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_SAME = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Flatten,
         nn.Unflatten)
_LIPSCHITZ = {nn.GELU: 1.13, nn.SiLU: 1.1, nn.ELU: 1.0, nn.ReLU6: 1.0, nn.Hardtanh: 1.0,
              nn.Softplus: 1.0, nn.Mish: 1.09, nn.Hardswish: 1.5}


class Unsupported(Exception):
    """An operation the bounds cannot follow (its message names the node)."""


def rounding_unit(t: Tensor) -> float:
    """Unit roundoff of ``t``'s floating dtype (2**-24 for float32)."""
    return float(torch.finfo(t.dtype).eps) / 2 if t.is_floating_point() else 0.0


def golden_values(prog: Program, x: Tensor) -> dict[fx.Node, Tensor]:
    """Value of every node of ``prog`` for input ``x`` (the golden run, eval mode)."""
    out: dict[fx.Node, Tensor] = {}

    def sink(node: fx.Node, v: Any) -> None:
        if isinstance(v, Tensor):
            out[node] = v

    with torch.no_grad():
        prog.run({prog.input: x}, 0, prog.end, set(prog.nodes), sink)
    return out


def _gamma(n: int, u: float) -> float:
    return KAPPA * n * u / max(1e-12, 1 - n * u)


def _abs_linear(m: nn.Module, r: Tensor) -> Tensor:
    w = m.weight.detach().abs().to(r.dtype)
    if isinstance(m, nn.Linear):
        return r @ w.T
    kw = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
    if getattr(m, "padding_mode", "zeros") != "zeros":
        raise Unsupported(f"{type(m).__name__} with padding_mode={m.padding_mode!r}")
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        fn = {1: nnf.conv_transpose1d, 2: nnf.conv_transpose2d, 3: nnf.conv_transpose3d}
        return fn[w.dim() - 2](r, w, None, output_padding=m.output_padding, **kw)
    fn = {1: nnf.conv1d, 2: nnf.conv2d, 3: nnf.conv3d}
    return fn[w.dim() - 2](r, w, None, **kw)


_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d)


def fan_in(m: nn.Module) -> int:
    """Terms of each output's dot product (an upper bound for transposed convolutions)."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return int(w.shape[1])
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        return int(w.shape[0] // m.groups * w[0, 0].numel())  # (in, out / groups, *k)
    return int(w[0].numel())


def layer_rounding(m: nn.Module, z_in: Tensor, r_in: Tensor) -> Tensor:
    """Rounding radius of a Conv/ConvT/Linear output computed from inputs within ``r_in``
    of the golden ``z_in``: golden and faulty runs both round."""
    g = _gamma(fan_in(m) + 1, rounding_unit(z_in))
    mag = _abs_linear(m, 2 * z_in.abs() + r_in)
    b = getattr(m, "bias", None)
    if isinstance(b, Tensor):
        shape = [1, -1] + [1] * (mag.dim() - 2)
        mag = mag + 2 * b.detach().abs().to(mag.dtype).reshape(shape)
    return g * mag


def ulp_rounding(z: Tensor, r: Tensor) -> Tensor:
    """Rounding radius of a value computed within ``r`` of golden ``z`` under the unit
    roundoff model: every computed value is within ``ULPS`` units of roundoff of the exact
    one, in the golden and in the faulty run."""
    return ULPS * rounding_unit(z) * (2 * z.abs() + r)


def _slope_act(m: Any, z: Tensor, r: Tensor) -> Tensor | float:
    """Largest |slope| of an elementwise activation on ``[z - r, z + r]``."""
    if isinstance(m, nn.ReLU) or m in (torch.relu, nnf.relu):
        return (z + r > 0).to(r.dtype)
    if isinstance(m, nn.LeakyReLU):
        a = abs(float(m.negative_slope))
        return torch.where(z + r < 0, min(a, 1.0), max(a, 1.0)).to(r.dtype)
    lo, hi = z - r, z + r
    near0 = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(z)))
    if isinstance(m, nn.Sigmoid) or m in (torch.sigmoid, nnf.sigmoid):
        s = torch.sigmoid(near0)
        return s * (1 - s)
    if isinstance(m, nn.Tanh) or m in (torch.tanh, nnf.tanh):
        return 1 - torch.tanh(near0) ** 2
    for cls, lip in _LIPSCHITZ.items():
        if isinstance(m, cls):
            return lip
    raise Unsupported(type(m).__name__)


def _is_act(m: Any) -> bool:
    return isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, *_LIPSCHITZ)) \
        or m in (torch.relu, nnf.relu, torch.sigmoid, nnf.sigmoid, torch.tanh, nnf.tanh)


class _Ctx:
    """Options of one propagation: fixed activation slopes (``fixed``), slopes to record
    (``record``) and whether rounding is added (``rounding``)."""

    def __init__(self, fixed: dict | None, record: dict | None, rounding: bool,
                 model: str) -> None:
        self.fixed, self.record, self.rounding, self.model = fixed, record, rounding, model

    def slope(self, node: fx.Node, m: Any, z: Tensor, r: Tensor) -> Tensor | float:
        if self.fixed is not None:
            return self.fixed[node]
        s = _slope_act(m, z, r)
        if self.record is not None:
            self.record[node] = s
        return s

    def rnd(self, value: Any) -> Any:
        return value if self.rounding else 0.0


def _two(fn: Any, f: Tensor, r: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return fn(f), None if r is None else fn(r)


def _plus(r: Tensor | None, extra: Any) -> Tensor | None:
    return None if r is None else r + extra


def _step(prog: Program, node: fx.Node, golden: dict[fx.Node, Tensor],
          rad: dict[fx.Node, tuple[Tensor, Tensor | None]], ctx: _Ctx
          ) -> tuple[Tensor, Tensor | None]:
    """Radii ``(F, R)`` of ``node`` from those of its inputs (``R`` None: not tracked)."""
    args = node.args
    first = args[0] if args else None
    name = getattr(node.target, "__name__", str(node.target))

    def tot(f: Tensor, r: Tensor | None) -> Tensor:
        return f if r is None else f + r

    if node.op == "call_module":
        m = prog.gm.get_submodule(str(node.target))
        f, r = rad[first]  # type: ignore[index]
        if isinstance(m, _LINEAR):
            fo, ro = _two(lambda v: _abs_linear(m, v), f, r)
            if ctx.rounding and ro is not None:
                ro = ro + (layer_rounding(m, golden[first], tot(f, r))
                           if ctx.model == "worst-case" else ulp_rounding(golden[node], fo + ro))
            return fo, ro
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            if m.training or m.running_var is None:
                raise Unsupported("BatchNorm in training mode")
            s = (m.weight.detach().abs() if m.weight is not None else 1.0) / torch.sqrt(
                m.running_var + m.eps)
            s = s.to(f.dtype).reshape([1, -1] + [1] * (f.dim() - 2))
            u = 8 * rounding_unit(f)
            return f * s, _plus(None if r is None else r * s,
                                ctx.rnd(u * (golden[node].abs() * 2 + tot(f, r) * s)))
        if _is_act(m):
            s = ctx.slope(node, m, golden[first], tot(f, r))
            u = 8 * rounding_unit(f)
            return f * s, _plus(None if r is None else r * s,
                                ctx.rnd(u * (2 * golden[node].abs() + tot(f, r) * s)))
        if isinstance(m, _SAME + _POOLS) or (isinstance(m, nn.Upsample) and m.mode in (
                "nearest", "linear", "bilinear", "trilinear")):
            return _two(m, f, r)
        raise Unsupported(f"module {node.target} ({type(m).__name__})")
    if node.op == "call_function" and node.target in (operator.add, torch.add, operator.sub,
                                                       torch.sub):
        if node.kwargs.get("alpha", 1) != 1:
            raise Unsupported(f"{node.name}: add with alpha")
        parts = [rad[a] for a in args[:2] if isinstance(a, fx.Node) and a in rad]
        shape = golden[node].shape
        f = sum(torch.broadcast_to(p[0], shape) for p in parts)
        r = None if any(p[1] is None for p in parts) else \
            sum(torch.broadcast_to(p[1], shape) for p in parts)  # type: ignore[arg-type]
        u = 2 * rounding_unit(golden[node])
        return f, _plus(r, ctx.rnd(u * (2 * golden[node].abs() + tot(f, r))))  # type: ignore
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        consts = [a for a in args[:2] if not (isinstance(a, fx.Node) and a in rad)]
        if len(consts) != 1 or isinstance(consts[0], fx.Node):
            raise Unsupported(f"{node.name}: product of perturbed values")
        c = abs(float(consts[0]))
        f, r = rad[next(a for a in args[:2] if isinstance(a, fx.Node) and a in rad)]
        return f * c, _plus(None if r is None else r * c, ctx.rnd(
            2 * rounding_unit(f) * (2 * golden[node].abs() + c * tot(f, r))))
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        seq = args[0]
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        fs = [rad[a][0] if a in rad else torch.zeros_like(golden[a]) for a in seq]
        if any(a in rad and rad[a][1] is None for a in seq):
            return torch.cat(fs, dim), None
        rs = [rad[a][1] if a in rad else torch.zeros_like(golden[a]) for a in seq]
        return torch.cat(fs, dim), torch.cat(rs, dim)  # type: ignore[arg-type]
    if node.op == "call_function" and _is_act(node.target):
        f, r = rad[first]  # type: ignore[index]
        s = ctx.slope(node, node.target, golden[first], tot(f, r))
        u = 8 * rounding_unit(f)
        return f * s, _plus(None if r is None else r * s,
                            ctx.rnd(u * (2 * golden[node].abs() + tot(f, r) * s)))
    same_fn = node.op == "call_function" and (node.target in _VIEW_FUNCS or node.target in
                                              _POOL_FUNCS or (node.target is nnf.interpolate
                                              and node.kwargs.get("mode", "nearest") in
                                              ("nearest", "bilinear", "linear")))
    if same_fn or (node.op == "call_method" and name in _VIEW_METHODS):
        if any(isinstance(a, fx.Node) and a in rad for a in list(args[1:]) +
               list(node.kwargs.values())):
            raise Unsupported(f"{node.name}: perturbed argument")
        rest = fx.node.map_arg(args[1:], lambda n: golden[n] if n in golden else prog.consts[n])
        f, r = rad[first]  # type: ignore[index]
        if node.op == "call_method":
            return _two(lambda v: getattr(v, name)(*rest, **node.kwargs), f, r)
        return _two(lambda v: node.target(v, *rest, **node.kwargs), f, r)  # type: ignore
    raise Unsupported(f"{node.op} {name} ({node.name})")


def propagate(prog: Program, golden: dict[fx.Node, Tensor], start: int, f0: Tensor,
              r0: Tensor | None = None, *, slopes: dict | None = None,
              record: dict | None = None, rounding: bool = True, model: str = "ulp"
              ) -> tuple[Tensor, Tensor | None]:
    """``(F, R)`` radii at the model output for radius ``f0`` (and rounding ``r0``) at the
    output of node ``start``; see the module docstring. ``record``: a dict that receives the
    slope chosen at every activation; ``slopes``: such a dict, used instead of choosing (the
    propagation is then linear in ``f0`` and ``r0``, valid while the radii stay below those
    the slopes were chosen for); ``rounding=False`` with ``r0=None`` tracks ``F`` only (``R``
    is None). ``model``: rounding of Conv/ConvT/Linear outputs, ``"worst-case"`` (the
    dot-product bound, any summation order) or ``"ulp"`` (:func:`ulp_rounding`). Raises
    :class:`Unsupported`."""
    if model not in ROUNDING:
        raise ValueError(f"model: expected one of {ROUNDING}, got {model!r}")
    ctx = _Ctx(slopes, record, rounding, model)
    r_start = r0 if r0 is not None else (torch.zeros_like(f0) if rounding else None)
    rad: dict[fx.Node, tuple[Tensor, Tensor | None]] = {prog.nodes[start]: (f0, r_start)}
    out = prog.output
    with torch.no_grad():
        for node in prog.nodes[start + 1 : prog.end]:
            if node.op in ("placeholder", "get_attr"):
                continue
            if not any(a in rad for a in node.all_input_nodes):
                continue
            f, r = _step(prog, node, golden, rad, ctx)
            rad[node] = (f, r)
    if out not in rad:
        z = torch.zeros_like(golden[out])
        return z, z if r_start is not None else None
    return rad[out]
