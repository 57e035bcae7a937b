"""What "a layer" is, for every part of flipguard that walks a model: the torch.fx leaf rule,
forward hooks registered and removed as one, eval mode with every module's mode restored.

A *layer* is a torch.nn leaf module (Conv2d, Linear, ...) or any module that owns
parameters itself and has no children, so each parametrised layer is one ``call_module``
node of the trace and one hook point.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten())
>>> seen = {}
>>> def keep(name, m, inp, out):
...     seen[name] = out.shape
>>> with forward_hooks({"0": net[0]}, keep):
...     _ = net(torch.zeros(1, 1, 5, 5))
>>> seen["0"]
torch.Size([1, 2, 3, 3])
>>> evenly_spaced(10, 4).tolist()
[0, 3, 6, 9]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch import fx, nn

__all__ = ["LayerTracer", "eval_mode", "evenly_spaced", "forward_hooks", "is_layer"]


def is_layer(m: nn.Module) -> bool:
    """A module with parameters of its own and no children."""
    return next(iter(m.parameters(recurse=False)), None) is not None \
        and next(iter(m.children()), None) is None


class LayerTracer(fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn leaves plus every :func:`is_layer` module."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or is_layer(m)


Hook = Callable[[str, nn.Module, tuple, Any], Any]
"""``hook(name, module, inputs, output)``; a non-None return value replaces the output."""


@contextmanager
def forward_hooks(modules: Mapping[str, nn.Module], hook: Hook) -> Iterator[None]:
    """Register ``hook`` as a forward hook on every named module for the ``with`` block."""
    def bind(name: str) -> Callable[..., Any]:
        return lambda m, inp, out: hook(name, m, inp, out)

    handles = [m.register_forward_hook(bind(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; every submodule's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """``min(k, n)`` distinct indices spread evenly over ``range(n)`` (all when ``k`` is
    None), first and last included — the image subsets and probes of campaigns."""
    if k is None or k >= n:
        return np.arange(n, dtype=np.int64)
    if k < 1:
        raise ValueError(f"expected a positive count, got {k}")
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))
