"""Deployable hardened model: Ranger-style clamping of the activations entering chosen layers.

Each chosen layer gets two buffers, ``fg_act_lo`` / ``fg_act_hi`` (its input range measured on
fault-free training data), and a forward pre-hook that clamps its input to them before the
layer runs. Module names, weights and the module tree are unchanged, so fault addresses of
the original model stay valid (a fault in the output of layer ``L`` is clamped when it enters
the next chosen layer), the model stays ``torch.fx`` traceable and the hook runs wherever the
module is called. ``torch.clamp`` propagates NaN (``clamp(nan, lo, hi)`` is NaN), so NaN is
first replaced by 0 and then clamped into ``[lo, hi]``; +/-inf clamp to the bounds.

:mod:`flipguard.study.hardening` saves it as a run directory (``RUN/hardened/``) that
``load_run`` and ``flipguard evaluate`` load as is (``build_hardened`` rebuilds the base
network and :func:`attach_clamps` gives it its buffers back).

>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
>>> hard = harden_model(net, {"2": (0.0, 1.0)})
>>> clamped_layers(hard)
['2']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults import DEFAULT_LAYER_TYPES
from flipguard.layers import eval_mode, forward_hooks

__all__ = ["BUFFER_HI", "BUFFER_LO", "attach_clamps", "clamp_activation", "clamped_layers",
           "default_clamp_layers", "harden_model", "measure_input_bounds", "open_clamps"]

BUFFER_LO, BUFFER_HI = "fg_act_lo", "fg_act_hi"


def clamp_activation(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """NaN -> 0, then clamp to ``[lo, hi]`` (``torch.clamp`` alone keeps NaN).

    >>> clamp_activation(torch.tensor([float("nan"), 5.0, -5.0]), 0.5, 2.0).tolist()
    [0.5, 2.0, 0.5]
    """
    lo_t = torch.as_tensor(lo, dtype=x.dtype, device=x.device)
    hi_t = torch.as_tensor(hi, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.where(torch.isnan(x), torch.zeros_like(x), x), lo_t, hi_t)


def _clamp_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not args or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
        return None
    lo, hi = getattr(module, BUFFER_LO), getattr(module, BUFFER_HI)
    return (clamp_activation(args[0], lo, hi), *args[1:])


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"clamp_layers: {name!r} is not a module of the model") from None


def attach_clamps(model: nn.Module, bounds: Mapping[str, tuple[float, float]]) -> nn.Module:
    """In place: give each layer of ``bounds`` its clamp buffers and input pre-hook."""
    for name, (lo, hi) in bounds.items():
        if not float(lo) <= float(hi):
            raise ConfigError(f"bounds: expected lo <= hi for {name!r}, got [{lo}, {hi}]")
        m = _module(model, name)
        if hasattr(m, BUFFER_LO):
            getattr(m, BUFFER_LO).fill_(float(lo))
            getattr(m, BUFFER_HI).fill_(float(hi))
            continue
        m.register_buffer(BUFFER_LO, torch.tensor(float(lo), dtype=torch.float32))
        m.register_buffer(BUFFER_HI, torch.tensor(float(hi), dtype=torch.float32))
        m.register_forward_pre_hook(_clamp_hook)
    return model


def harden_model(model: nn.Module, bounds: Mapping[str, tuple[float, float]]) -> nn.Module:
    """A deep copy of ``model`` with input clamps on the layers of ``bounds`` (eval mode)."""
    return attach_clamps(copy.deepcopy(model), bounds).eval()


def clamped_layers(model: nn.Module) -> list[str]:
    """Names of the modules that carry clamp buffers, in module order."""
    return [n for n, m in model.named_modules() if hasattr(m, BUFFER_LO)]


def open_clamps(model: nn.Module, layers: Sequence[str]) -> nn.Module:
    """In place: clamp buffers on ``layers`` at ``[-inf, inf]`` (filled by ``load_state_dict``
    of a saved hardened model)."""
    return attach_clamps(model, {n: (-math.inf, math.inf) for n in layers})


def measure_input_bounds(model: nn.Module, inputs: Tensor, layers: Sequence[str],
                         batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """Per-layer (min, max) of the (first) input of each of ``layers`` over ``inputs``.

    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    >>> measure_input_bounds(net, torch.tensor([[-1.0], [2.0]]), ["0"])
    {'0': (-1.0, 2.0)}
    """
    lo = {n: math.inf for n in layers}
    hi = {n: -math.inf for n in layers}

    def record(name: str, _m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0].detach()
        x = x[torch.isfinite(x)]
        if x.numel():
            lo[name] = min(lo[name], float(x.min()))
            hi[name] = max(hi[name], float(x.max()))

    mods = {n: _module(model, n) for n in layers}
    with eval_mode(model), forward_hooks(mods, record), torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            model(inputs[i:i + batch_size])
    missing = [n for n in layers if lo[n] > hi[n]]
    if missing:
        raise ConfigError(f"clamp_layers: {missing[0]!r} received no finite input")
    return {n: (lo[n], hi[n]) for n in layers}


def default_clamp_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """Parametrised layers (conv/linear) in execution order, except the first one (its
    input is the image, not an activation).

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> default_clamp_layers(net, torch.zeros(1, 2))
    ['2']
    """
    order: list[str] = []

    def record(name: str, *_: Any) -> None:
        if name not in order:
            order.append(name)

    mods = {n: m for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES)}
    with forward_hooks(mods, record), torch.no_grad():
        model(example_input[:1])
    return order[1:]
