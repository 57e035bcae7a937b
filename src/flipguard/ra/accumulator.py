"""Partial sums: an upset of an accumulator bit, then rounding to the output format.

A partial sum lives in an accumulator word of ``accumulator_bits`` (an fp32 word for float
operands, an ``int32`` for int8). The layer output is that word *after* requantisation to the
operand format, so a hit of accumulator bit ``b`` reaches the output as:

* **float** (fp32 accumulator, output ``fmt``): the fp32 word with bit ``b`` flipped, rounded
  to ``fmt`` (round to nearest even). Same format: bit ``b`` of the output. fp32 -> fp16/bf16:
  sign -> sign; mantissa bits below the output's precision are **masked** except the first one
  below it (the rounding bit: the output moves by one ulp, counted as output bit 0); the
  others move by ``d = 23 - mantissa bits`` (output bit ``b - d``); exponent bits map 1:1
  (bf16; fp16: the 4 low ones, the 4 high ones overflow to inf / underflow to 0 and count as
  the exponent MSB).
* **int8** (``int32`` accumulator, requantisation ratio ``r = s_w s_x / s_y``): the output is
  ``clamp(round(acc * r), -128, 127)``; flipping bit ``b`` adds ``±2^b`` to ``acc``, i.e.
  ``u = 2^b r`` output steps. ``u < 1``: the output moves one step with probability ``u``
  (output bit 0), else the hit is **masked**; ``u >= 1``: it acts as output bit
  ``k = round(log2 u)`` (a change of ``±2^k`` steps), capped at the sign bit (``k = 7``):
  from ``u ~ 91`` on a full-scale error, saturating at -128 / 127 for ``u >= 255``.

These hold exactly for the final accumulated value and for any earlier partial sum (an
integer accumulator adds modulo ``2^acc_bits``; for floats up to the rounding of later
additions). :func:`psum_map` gives the resulting distribution over output bits, used by the
systolic exposure model; :func:`int_hit` / :func:`float_hit` are the exact value mappings.

>>> int(int_hit(np.array([1000]), 10, ratio=2.0 ** -10)[0])  # 1000 + 1024 -> round(1.98)
2
>>> float(psum_map(get_format("int8"), 32, 2.0 ** -10)[3, -1])  # u = 1/128: masked 127/128
0.9921875
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flipguard.errors import ConfigError
from flipguard.faults import FloatFormat, NumberFormat, get_format

__all__ = ["flip_int", "requantise", "int_hit", "round_to", "float_hit", "psum_map",
           "requant_ratio", "MASKED"]

MASKED = -1  # column of psum_map holding the masked share


def flip_int(acc: np.ndarray, bit: int, acc_bits: int = 32) -> np.ndarray:
    """Two's-complement ``acc_bits``-bit words ``acc`` with ``bit`` flipped (as int64)."""
    if not 0 <= bit < acc_bits <= 64:
        raise ConfigError(f"bit: expected 0..{acc_bits - 1}, got {bit}")
    a = np.asarray(acc, dtype=object)
    mod = 1 << acc_bits
    u = (a % mod) ^ (1 << bit)
    out = np.where(u >= mod >> 1, u - mod, u)
    return out.astype(np.int64) if acc_bits < 64 else out


def requantise(acc: np.ndarray, ratio: float, out_bits: int = 8) -> np.ndarray:
    """``clamp(round_half_even(acc * ratio), -2^(n-1), 2^(n-1) - 1)`` (saturating)."""
    lo, hi = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    return np.clip(np.rint(np.asarray(acc, dtype=np.float64) * ratio), lo, hi).astype(np.int64)


def int_hit(acc: np.ndarray, bit: int, ratio: float, acc_bits: int = 32,
            out_bits: int = 8) -> np.ndarray:
    """Output (integer steps) after flipping accumulator ``bit`` and requantising."""
    return requantise(flip_int(acc, bit, acc_bits), ratio, out_bits)


def round_to(values: np.ndarray, fmt: str | NumberFormat) -> np.ndarray:
    """float32 ``values`` rounded to float format ``fmt`` (RNE; overflow -> inf)."""
    f = get_format(fmt)
    t = torch.as_tensor(np.asarray(values, dtype=np.float32))
    return f.quantize(t).numpy()


def float_hit(acc: np.ndarray, bit: int, out: str | NumberFormat = "fp32",
              acc_fmt: str | NumberFormat = "fp32") -> np.ndarray:
    """Output value after flipping ``bit`` of the ``acc_fmt`` accumulator word holding
    ``acc`` (already representable in ``acc_fmt``) and rounding to ``out``."""
    a = get_format(acc_fmt)
    if not isinstance(a, FloatFormat) or not 0 <= bit < a.bits:
        raise ConfigError(f"bit: expected 0..{a.bits - 1} of a float accumulator, got {bit}")
    words = a.encode(torch.as_tensor(np.asarray(acc, dtype=np.float32)))
    mask = (1 << bit) - (1 << a.bits if bit == a.bits - 1 else 0)
    hit = a.decode(torch.bitwise_xor(words, torch.tensor(mask, dtype=words.dtype)))
    return round_to(hit.numpy(), out)


def requant_ratio(w_amax: float, x_amax: float, y_amax: float, k: int) -> float:
    """``r = s_w s_x / s_y`` with symmetric int8 scales ``s = max|v| / 127`` of the weight,
    the layer input and the layer output; when the example gives a zero input or output,
    ``max|y| = sqrt(K) max|w| max|x|`` is assumed (``r = 1 / (127 sqrt K)``)."""
    if min(w_amax, x_amax, y_amax) > 0 and all(map(math.isfinite, (w_amax, x_amax, y_amax))):
        return w_amax * x_amax / (127.0 * y_amax)
    return 1.0 / (127.0 * math.sqrt(max(k, 1)))


def psum_map(fmt: NumberFormat, acc_bits: int, ratio: float | None = None) -> np.ndarray:
    """``(acc_bits, fmt.bits + 1)`` array: row ``b`` = how a hit of accumulator bit ``b``
    reaches the output, as shares of output bits ``0..fmt.bits-1`` and (last column) of
    masked hits (module docstring). ``ratio``: int8 requantisation ratio."""
    n = fmt.bits
    out = np.zeros((acc_bits, n + 1))
    if isinstance(fmt, FloatFormat):
        if acc_bits == n:
            out[np.arange(n), np.arange(n)] = 1.0
            return out
        if acc_bits != 32:
            raise ConfigError(f"accumulator_bits.{fmt.name}: expected {n} or 32, got {acc_bits}")
        m, e = fmt.man_bits, fmt.exp_bits
        d = 23 - m
        for b in range(32):
            if b == 31:
                k = n - 1
            elif b >= 23:
                j = b - 23
                k = m + j if (e == 8 or j < e - 1) else n - 2
            elif b >= d:
                k = b - d
            elif b == d - 1:
                k = 0
            else:
                k = MASKED
            out[b, k] = 1.0
        return out
    if ratio is None or not ratio > 0:
        raise ConfigError(f"psum_map: {fmt.name} needs a positive requantisation ratio")
    for b in range(acc_bits):
        u = math.ldexp(ratio, b)
        if u < 1:
            out[b, 0], out[b, MASKED] = u, 1.0 - u
        else:
            out[b, min(n - 1, int(round(math.log2(u))))] = 1.0
    return out
