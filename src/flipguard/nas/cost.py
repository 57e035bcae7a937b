"""Hardware cost of a network: stored parameter bits and multiply-accumulates.

``memory_bits``: every parameter and floating-point buffer (profiled activation bounds)
is stored; the weights and biases of Conv/ConvTranspose/Linear layers in the number format
``fmt`` (``fp32`` | ``fp16`` | ``bf16`` | ``int8`` | ``int8-channel``; INT8 adds one FP32
scale per tensor, ``int8-channel`` one per output channel of a weight), everything else in
FP32. ``count_macs``: multiply-accumulates of one forward pass of one sample, counted by
forward hooks on the Conv/ConvTranspose/Linear layers (``out_pixels * C_out * C_in/groups *
kernel`` for a convolution, ``in_pixels * C_in * C_out/groups * kernel`` for a transposed
one, ``rows * in * out`` for a linear layer).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
...                           torch.nn.Linear(4 * 6 * 6, 10))
>>> memory_bits(net), count_macs(net, torch.zeros(1, 1, 8, 8))
(47680, 2736)
>>> memory_bits(net, "int8")
12048
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.layers import eval_mode

__all__ = ["GEMMS", "count_macs", "count_parameters", "memory_bits"]

GEMMS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d, nn.Linear)
_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int8-channel": 8}


def count_parameters(model: nn.Module) -> int:
    """Scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def memory_bits(model: nn.Module, fmt: str = "fp32") -> int:
    """Bits needed to store ``model``'s parameters and floating buffers (module docstring)."""
    if fmt not in _BITS:
        raise ConfigError(f"--format: expected one of {', '.join(_BITS)}, got {fmt!r}")
    bits, seen = 0, set()
    for m in model.modules():
        gemm = isinstance(m, GEMMS)
        for name, p in m.named_parameters(recurse=False):
            seen.add(id(p))
            if gemm and name in ("weight", "bias"):
                bits += p.numel() * _BITS[fmt]
                if fmt == "int8":
                    bits += 32
                elif fmt == "int8-channel":
                    bits += 32 * (_out_channels(m) if name == "weight" else 1)
            else:
                bits += p.numel() * 32
        for b in m.buffers(recurse=False):
            if b.is_floating_point() and id(b) not in seen:
                seen.add(id(b))
                bits += b.numel() * 32
    return int(bits)


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    return int(m.out_channels)  # type: ignore[arg-type]


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of one forward pass per sample of ``example`` (N, ...)."""
    total = [0]

    def hook(m: nn.Module, inp: tuple, out: Tensor) -> None:
        x = inp[0]
        if isinstance(m, nn.Linear):
            rows = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
            total[0] += rows * m.in_features * m.out_features
            return
        k = math.prod(m.kernel_size)  # type: ignore[arg-type]
        g = int(m.groups)  # type: ignore[arg-type]
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            total[0] += math.prod(x.shape[2:]) * m.in_channels * (m.out_channels // g) * k
        else:
            total[0] += math.prod(out.shape[2:]) * m.out_channels * (m.in_channels // g) * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, GEMMS)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return int(total[0])
