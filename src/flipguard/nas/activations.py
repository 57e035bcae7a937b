"""Activations of the search space, bounded ones included (the family known to raise the
resilience of a network to bit flips by stopping a huge faulty value from propagating).

* ``leaky`` — LeakyReLU(0.2), the default CAE's activation (unbounded);
* ``relu6`` — ``min(max(x, 0), 6)``: a fixed bound;
* ``ranger`` — LeakyReLU then a clamp to the range ``[lo, hi]`` profiled on the training
  images after training (Ranger, Chen et al., DSN 2021: saturate out-of-range values);
* ``clipact`` — ReLU, and a value above the profiled bound ``T`` is set to 0 (FT-ClipAct,
  Hoang et al., DATE 2020, with ``T`` = the profiled maximum instead of their per-layer
  search);
* ``learned`` — ``min(max(x, 0), b)`` with a learned per-channel bound ``b`` trained jointly
  with the weights (PACT, Choi et al. 2018; the learned-bound idea of FitAct, Mahmoud et al.
  2022, which fits the bounds after training).

Profiled bounds are plain buffers (``+-inf`` until :func:`profile_bounds` sets them, so
training is unaffected); learned bounds are parameters. Every module is an ordinary
``nn.Module`` made of elementwise tensor ops, so ``torch.fx`` traces it and the fault
engine's layer rule (a module owning parameters is one layer) holds.

>>> import torch
>>> act = make_activation("ranger", 2)
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), act)
>>> profile_bounds(net, torch.rand(4, 1, 3, 3))
1
>>> bool(torch.isfinite(act.hi).all())
True
>>> act(torch.full((1, 2, 1, 1), 1e30)).max().item() == act.hi.item()
True
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from flipguard.errors import ConfigError


def clip_to_zero(x: Tensor, hi: Tensor) -> Tensor:
    """``relu(x)`` with the values above ``hi`` set to 0 (NaN stays NaN). A single
    ``torch.fx`` node (wrapped), so the exposure analysis sees one element-wise op.

    >>> clip_to_zero(torch.tensor([-1.0, 0.5, 3.0]), torch.tensor(1.0)).tolist()
    [0.0, 0.5, 0.0]
    """
    y = torch.relu(x)
    return torch.where(y > hi, torch.zeros_like(y), y)


fx.wrap("clip_to_zero")

__all__ = ["ACTIVATIONS", "ClipAct", "LearnedClip", "Ranger", "make_activation",
           "profile_bounds", "BOUNDED", "clip_to_zero"]

ACTIVATIONS = ("leaky", "relu6", "ranger", "clipact", "learned")
"""Names accepted by :func:`make_activation`."""
BOUNDED = ("relu6", "ranger", "clipact", "learned")
"""The activations whose output is bounded after profiling/training."""


class Ranger(nn.Module):
    """LeakyReLU(``slope``) clamped to the profiled ``[lo, hi]`` (identity range until
    profiled)."""

    def __init__(self, slope: float = 0.2) -> None:
        super().__init__()
        self.slope = float(slope)
        self.register_buffer("lo", torch.full((1,), -torch.inf))
        self.register_buffer("hi", torch.full((1,), torch.inf))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.nn.functional.leaky_relu(x, self.slope)
        return torch.minimum(torch.maximum(y, self.lo), self.hi)


class ClipAct(nn.Module):
    """ReLU whose outputs above the profiled bound ``T`` become 0 (no bound until
    profiled)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hi", torch.full((1,), torch.inf))

    def forward(self, x: Tensor) -> Tensor:
        return clip_to_zero(x, self.hi)


class LearnedClip(nn.Module):
    """``min(relu(x), b)`` with a learned bound ``b`` per channel (axis 1 of an ``ndim``-D
    input), initialised to ``init``; the bound is a parameter, trained with the weights."""

    def __init__(self, channels: int, init: float = 2.0, ndim: int = 4) -> None:
        super().__init__()
        shape = (1, int(channels)) + (1,) * (int(ndim) - 2)
        self.bound = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.relu(x), self.bound)


def make_activation(name: str, channels: int) -> nn.Module:
    """The activation ``name`` (one of :data:`ACTIVATIONS`) for ``channels`` channels.

    >>> type(make_activation("leaky", 4)).__name__
    'LeakyReLU'
    """
    if name == "leaky":
        return nn.LeakyReLU(0.2)
    if name == "relu6":
        return nn.ReLU6()
    if name == "ranger":
        return Ranger()
    if name == "clipact":
        return ClipAct()
    if name == "learned":
        return LearnedClip(channels)
    raise ConfigError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")


def profile_bounds(model: nn.Module, images: Tensor, batch_size: int = 64) -> int:
    """Set the bounds of every profiled activation (:class:`Ranger`, :class:`ClipAct`) of
    ``model`` to the range of its (unbounded) output over ``images``; returns how many
    modules were profiled. Bounds are reset first, so profiling twice gives the same bounds.
    """
    mods = [m for m in model.modules() if isinstance(m, (Ranger, ClipAct))]
    if not mods:
        return 0
    for m in mods:  # open the bounds: the profile sees the unclamped values
        if isinstance(m, Ranger):
            m.lo.fill_(-torch.inf)
        m.hi.fill_(torch.inf)
    ranges: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(m: nn.Module, inp: tuple, out: Tensor) -> None:
        lo, hi = out.detach().min(), out.detach().max()
        old = ranges.get(id(m))
        ranges[id(m)] = (lo, hi) if old is None else (torch.minimum(old[0], lo),
                                                      torch.maximum(old[1], hi))

    handles = [m.register_forward_hook(hook) for m in mods]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    for m in mods:
        lo, hi = ranges[id(m)]
        if isinstance(m, Ranger):
            m.lo.copy_(lo)
        m.hi.copy_(hi)
    return len(mods)
