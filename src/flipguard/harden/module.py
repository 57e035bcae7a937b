"""Deployable hardened model: Ranger-style clamping of the activations entering chosen layers.

Each chosen layer gets two buffers, ``fg_act_lo`` / ``fg_act_hi`` (its input range measured on
fault-free training data), and a forward pre-hook that clamps its input to them before the
layer runs. Module names, weights and the module tree are unchanged, so fault addresses of
the original model stay valid (a fault in the output of layer ``L`` is clamped when it enters
the next chosen layer), the model stays ``torch.fx`` traceable and the hook runs wherever the
module is called. ``torch.clamp`` propagates NaN (``clamp(nan, lo, hi)`` is NaN), so NaN is
first replaced by 0 and then clamped into ``[lo, hi]``; +/-inf clamp to the bounds.

Saved as a run directory (``RUN/hardened/``) whose ``model`` section is
``{"kind": "factory", "factory": "flipguard.harden.module:build_hardened",
"params": {"base": <original model section>, "clamp_layers": [...]}}``, so
``flipguard.run.load_run`` (and ``flipguard evaluate``) load it as is.

>>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
>>> hard = harden_model(net, {"2": (0.0, 1.0)})
>>> clamped_layers(hard)
['2']
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError

__all__ = ["BUFFER_HI", "BUFFER_LO", "FACTORY", "attach_clamps", "build_hardened",
           "clamp_activation", "clamped_layers", "default_clamp_layers", "harden_model",
           "measure_input_bounds", "save_hardened_run"]

BUFFER_LO, BUFFER_HI = "fg_act_lo", "fg_act_hi"
FACTORY = "flipguard.harden.module:build_hardened"


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


def measure_input_bounds(model: nn.Module, inputs: Tensor, layers: Sequence[str],
                         batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """Per-layer (min, max) of the (first) input of each of ``layers`` over ``inputs``."""
    lo = {n: math.inf for n in layers}
    hi = {n: -math.inf for n in layers}

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x[torch.isfinite(x)]
            if x.numel():
                lo[name] = min(lo[name], float(x.min()))
                hi[name] = max(hi[name], float(x.max()))
        return hook

    handles = [_module(model, n).register_forward_pre_hook(hook_for(n)) for n in layers]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            for i in range(0, inputs.shape[0], batch_size):
                model(inputs[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    missing = [n for n in layers if lo[n] > hi[n]]
    if missing:
        raise ConfigError(f"clamp_layers: {missing[0]!r} received no finite input")
    return {n: (lo[n], hi[n]) for n in layers}


def default_clamp_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """Parametrised layers (conv/linear) in execution order, except the first one (its
    input is the image, not an activation)."""
    from flipguard.faults import DEFAULT_LAYER_TYPES

    order: list[str] = []
    mods = {n: m for n, m in model.named_modules() if isinstance(m, DEFAULT_LAYER_TYPES)}
    handles = [m.register_forward_pre_hook(
        lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in mods.items()]
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return order[1:]


def build_hardened(base: Mapping[str, Any], clamp_layers: Sequence[str]) -> nn.Module:
    """Factory used by ``flipguard.run.load_run``: the base model section's network with
    clamp buffers (filled by ``load_state_dict``) on ``clamp_layers``."""
    from flipguard.run import ModelSection, build_model

    model = build_model(ModelSection(**dict(base)))
    return attach_clamps(model, {n: (-math.inf, math.inf) for n in clamp_layers})


def save_hardened_run(run: Any, hardened: nn.Module, out: str | Path | None = None,
                      metrics: dict[str, Any] | None = None) -> Path:
    """Write ``hardened`` as a run directory (default ``RUN/hardened``) loadable by
    ``flipguard.run.load_run`` and evaluable with ``flipguard evaluate``."""
    from flipguard.run import ModelSection, save_run

    base = run.config.model
    if base.kind == "factory" and base.factory == FACTORY:
        raise ConfigError(f"{run.path}: already a hardened run; harden the original run")
    section = ModelSection(kind="factory", factory=FACTORY,
                           params={"base": base.model_dump(),
                                   "clamp_layers": clamped_layers(hardened)})
    config = run.config.model_copy(update={"model": section})
    return save_run(Path(out) if out is not None else Path(run.path) / "hardened", config,
                    hardened, metrics)
