"""In-place fault injection with exact restore, and activation faults through forward hooks.

Weight/bias faults overwrite the addressed element of the module's tensor and write the saved
original back on exit (bit-exact, no copy of the model). Activation faults register a
stateless forward hook: on *every* forward it replaces the element at the flat per-sample
``index`` of the module's output, for every sample of the batch.

>>> import torch
>>> from flipguard.faults import Fault
>>> net = torch.nn.Linear(2, 1)
>>> with inject(net, Fault("weight", "", 0, (31,))):
...     flipped = net.weight[0, 0].item()
>>> flipped == -net.weight[0, 0].item()
True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults import (
    DEFAULT_LAYER_TYPES,
    Fault,
    NumberFormat,
    apply_fault,
    get_format,
    is_noop,
    kernel_ids,
    noop_mask,
)
from flipguard.inject.graph import same_rows

__all__ = ["inject", "module_of", "resolve_target", "faulty_value", "bound_format",
           "activation_fault", "probe_block", "block_forward", "working_copy"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def module_of(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ConfigError(f"layer: unknown module {layer!r} (e.g. {', '.join(names)})") from None


def resolve_target(model: nn.Module, fault: Fault) -> tuple[nn.Module, Tensor]:
    """The module of ``fault.layer`` and its ``weight``/``bias`` tensor (range-checked)."""
    module = module_of(model, fault.layer)
    t = getattr(module, fault.target, None)
    if not isinstance(t, Tensor):
        raise ConfigError(f"target: module {fault.layer!r} ({type(module).__name__}) has no "
                          f"{fault.target} tensor")
    if not 0 <= fault.index < t.numel():
        raise ConfigError(f"index: expected 0..{t.numel() - 1} for {fault.layer}."
                          f"{fault.target}, got {fault.index}")
    return module, t


def bound_format(module: nn.Module, target: str, tensor: Tensor,
                 fmt: str | NumberFormat) -> NumberFormat:
    """``fmt`` bound to ``tensor`` (INT8 learns per-tensor/per-kernel scales; floats: itself)."""
    f = get_format(fmt)
    if f.is_bound:
        return f
    return f.bind(tensor, kernel_ids=kernel_ids(module, target).to(tensor.device))


def working_copy(model: nn.Module, fmt: NumberFormat, device: torch.device,
                 layers: Sequence[str] | None = None
                 ) -> tuple[nn.Module, dict[tuple[str, str], NumberFormat]]:
    """Golden model for ``fmt`` in eval mode, and the formats bound to each weight/bias of
    ``layers`` (default: every Conv/ConvTranspose/Linear). fp32 on the same device: the model
    itself; otherwise a deep copy whose tensors are replaced by ``fmt.quantize(...)``."""
    mods = dict(model.named_modules())
    bad = [n for n in (layers or ()) if n not in mods]
    if bad:
        raise ConfigError(f"layers: unknown module {bad[0]!r}")
    names = list(layers) if layers is not None else [
        n for n, m in mods.items() if isinstance(m, DEFAULT_LAYER_TYPES)]
    same = fmt.name == "fp32" and all(
        p.device.type == device.type and device.index in (None, p.device.index)
        for p in model.parameters())
    work = (model if same else copy.deepcopy(model)).to(device).eval()
    formats: dict[tuple[str, str], NumberFormat] = {}
    with torch.no_grad():
        for name in names:
            m = work.get_submodule(name)
            for target in ("weight", "bias"):
                t = getattr(m, target, None)
                if isinstance(t, Tensor):
                    formats[(name, target)] = bf = bound_format(m, target, t.detach(), fmt)
                    if fmt.name != "fp32":
                        t.detach().copy_(bf.quantize(t.detach()))
    return work, formats


def faulty_value(model: nn.Module, fault: Fault, fmt: str | NumberFormat = "fp32"
                 ) -> tuple[Tensor, Tensor, bool]:
    """``(golden, faulty, noop)`` 0-d values of the weight/bias element addressed by
    ``fault``; ``noop`` when the fault changes no stored bit (stuck-at equal to the bit)."""
    module, t = resolve_target(model, fault)
    old = t.detach()[_pos(fault.index, t)].clone()
    f = bound_format(module, fault.target, t.detach(), fmt).select(fault.index)
    noop = is_noop(old, fault, f)
    new = old if noop else apply_fault(old, fault, f).reshape(old.shape).to(old.dtype)
    return old, new, noop


def _pos(index: int, t: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(index, tuple(t.shape)))


@contextmanager
def inject(model: nn.Module, fault: Fault, fmt: str | NumberFormat = "fp32") -> Iterator[None]:
    """Context manager: ``fault`` is active inside the block, the model exactly restored after.

    Weight/bias: the stored word of the element is faulted via ``fmt`` (the model's values
    should already be representable in ``fmt``; the Engine quantises a working copy).
    Activation: a forward hook faults the element at flat index ``fault.index`` of each
    sample's output of ``fault.layer`` on every forward.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with inject(net, Fault("activation", "0", 1, (31,))):
        ...     y = net(torch.ones(3, 2))  # y[:, 1] has its sign flipped for all 3 samples
    """
    if fault.target == "activation":
        module = module_of(model, fault.layer)
        fmt_ = get_format(fmt)
        if fault.bits[-1] >= fmt_.bits:
            raise ConfigError(f"bits: expected 0..{fmt_.bits - 1} for {fmt_.name}, "
                              f"got {fault.bits[-1]}")

        def hook(_m: nn.Module, _inp: object, out: object) -> Tensor:
            return activation_fault(out, fault, fmt_)  # type: ignore[arg-type]

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        return
    _, t = resolve_target(model, fault)
    old, new, _ = faulty_value(model, fault, fmt)
    pos = _pos(fault.index, t)
    data = t.detach()
    with torch.no_grad():
        data[pos] = new
    try:
        yield
    finally:
        with torch.no_grad():
            data[pos] = old


def _row_format(fmt: NumberFormat, flat: Tensor, fault: Fault, per_sample: tuple[int, ...]
                ) -> NumberFormat:
    """Format for the faulted element of every row: INT8 uses a per-sample scale
    ``max|y| / 127`` (per sample and channel for "int8-channel")."""
    if fmt.bits != 8 or fmt.is_bound:
        return fmt
    rows = flat
    if fmt.name == "int8-channel" and len(per_sample) > 1:
        c = fault.index // int(np.prod(per_sample[1:]))
        rows = flat.reshape(flat.shape[0], per_sample[0], -1)[:, c]
    amax = rows.detach().abs().amax(dim=1).to(torch.float32)
    scale = torch.clamp_min(amax / 127.0, torch.finfo(torch.float32).eps)
    return get_format(fmt.name, scale=scale)


def activation_fault(out: Tensor, fault: Fault, fmt: str | NumberFormat = "fp32") -> Tensor:
    """New tensor: ``out`` (batch first) with the element at flat per-sample index
    ``fault.index`` of every sample faulted via ``fmt``; a stuck-at equal to the stored bit
    leaves the value untouched.

    >>> activation_fault(torch.ones(2, 3), Fault("activation", "x", 1, (31,)))[:, 1].tolist()
    [-1.0, -1.0]
    """
    if not isinstance(out, Tensor) or out.dim() < 1:
        raise ConfigError(f"layer: activation faults need a batched tensor output from "
                          f"{fault.layer!r}, got {type(out).__name__}")
    fmt_ = get_format(fmt)
    flat = out.reshape(out.shape[0], -1)
    if not 0 <= fault.index < flat.shape[1]:
        raise ConfigError(f"index: expected 0..{flat.shape[1] - 1} for the activation of "
                          f"{fault.layer}, got {fault.index}")
    f = _row_format(fmt_, flat, fault, tuple(out.shape[1:]))
    vals = flat[:, fault.index]
    new = apply_fault(vals, fault, f)
    if fault.kind != "flip":

        keep = noop_mask(vals, fault.mask, fault.kind, f)
        new = torch.where(keep, vals, new)
    res = out.clone(memory_format=torch.contiguous_format)
    res.view(out.shape[0], -1)[:, fault.index] = new
    return res


def _block_params(module: nn.Module, lo: int, hi: int) -> tuple[Tensor, Tensor | None]:
    w = module.weight.detach()
    w = (w[:, lo:hi] if isinstance(module, _CONVT) else w[lo:hi]).clone(
        memory_format=torch.contiguous_format)
    b = module.bias.detach()[lo:hi].clone() if module.bias is not None else None
    return w, b


def _call_block(module: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if isinstance(module, _CONV):
        return module._conv_forward(x, w, b)  # type: ignore[operator]
    if isinstance(module, _CONVT):
        m: Any = module
        fn = _CONVT_FN[len(m.stride)]
        return fn(x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    return F.linear(x, w, b)


def probe_block(module: nn.Module, x: Tensor, gold: Tensor, timed: bool = True) -> int:
    """Output-channel block size (8/16/32/64) for computing a faulty weight/bias's channels
    only: the block outputs on input ``x`` must be bit-identical to the full layer output
    ``gold`` (every block of the chosen size is checked; kernels are picked by shape, so
    this decides for every later weight value) and, when ``timed``, a block plus copying
    ``gold`` must be clearly cheaper than the full layer (``timed=False``: the smallest exact
    size).
    0 when none, and for modules other than groups=1 Conv/ConvTranspose and 2-D Linear."""
    if isinstance(module, nn.Linear):
        if x.dim() != 2:
            return 0
    elif not isinstance(module, _CONV + _CONVT) or getattr(module, "groups", 1) != 1:
        return 0
    c, best = gold.shape[1], 0
    best_t = _timed(lambda: module(x)) - _timed(gold.clone) if timed else float("inf")
    for size in (8, 16, 32, 64):
        if 2 * size > c:
            break
        if not _exact(module, x, gold, size, sorted({0, (c - 1) // size * size})):
            continue
        if not timed:
            best = size
            break
        t = _timed(lambda size=size: _call_block(module, x, *_block_params(module, 0, size)))
        if t < 0.8 * best_t:
            best, best_t = size, t
    return best if best and _exact(module, x, gold, best, range(0, c, best)) else 0


def _exact(module: nn.Module, x: Tensor, gold: Tensor, size: int, starts: Any) -> bool:
    try:
        return all(bool(same_rows(_call_block(module, x, *_block_params(module, lo, lo + size)),
                                  gold[:, lo : lo + size]).all()) for lo in starts)
    except RuntimeError:  # a backend without this shape
        return False


def _timed(fn: Any) -> float:
    """Seconds one call of ``fn()`` takes."""
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def block_forward(module: nn.Module, fault: Fault, new: Tensor, x: Tensor, size: int
                  ) -> tuple[int, int, Tensor]:
    """``(lo, hi, out)``: output channels ``lo..hi-1`` (the ``size`` block holding the
    faulty weight/bias element, set to ``new``) of the layer on input ``x``."""
    t = getattr(module, fault.target)
    coords = _pos(fault.index, t)
    o = coords[0] if fault.target == "bias" or not isinstance(module, _CONVT) else coords[1]
    c_out = t.shape[0] if fault.target == "bias" or not isinstance(module, _CONVT) \
        else t.shape[1]
    lo = o // size * size
    hi = min(lo + size, c_out)
    w, b = _block_params(module, lo, hi)
    with torch.no_grad():
        if fault.target == "bias":
            assert b is not None
            b[o - lo] = new
        elif isinstance(module, _CONVT):
            w[(coords[0], coords[1] - lo, *coords[2:])] = new
        else:
            w[(coords[0] - lo, *coords[1:])] = new
    return lo, hi, _call_block(module, x, w, b)
