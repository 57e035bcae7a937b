"""Number formats (FP32, FP16, BF16, INT8) and vectorised bit operations on stored words.

A *word* is the integer bit pattern a value is stored as: ``int32`` for FP32, ``int16`` for
FP16/BF16, ``int8`` for INT8 (two's complement, so the sign bit reads as a negative integer).
Bit 0 is the LSB.  Every operation is a tensor op on the tensors' own device (CPU or CUDA).

NaN handling is defined here (torch's own float->half/bfloat16 NaN conversion differs between
its scalar and vectorised kernels): encoding a NaN keeps its sign and top payload bits (and
sets the quiet bit only when those are all zero); decoding keeps NaN payloads exactly, so
``encode(decode(w)) == w`` for every word.

>>> fmt = get_format("fp32")
>>> fmt.field(30), fmt.bits_of_field("sign")
('exponent', (31,))
>>> fmt.decode(flip_bits(fmt.encode(torch.tensor([1.0])), 1 << 31)).tolist()
[-1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flipguard.errors import ConfigError

__all__ = [
    "NumberFormat",
    "FloatFormat",
    "Int8Format",
    "FORMAT_NAMES",
    "get_format",
    "bits_mask",
    "flip_bits",
    "set_bits",
    "clear_bits",
]

FORMAT_NAMES = ("fp32", "fp16", "bf16", "int8", "int8-channel")
_WIDTH = {torch.int8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}


def bits_mask(bits: Sequence[int] | int, width: int = 64) -> int:
    """Mask with the given bit positions set, as a *signed* ``width``-bit integer.

    >>> bits_mask((31,), 32)
    -2147483648
    """
    bits = (bits,) if isinstance(bits, int) else tuple(bits)
    mask = 0
    for b in bits:
        if not 0 <= int(b) < width:
            raise ConfigError(f"bits: expected bit positions in 0..{width - 1}, got {b}")
        mask |= 1 << int(b)
    return _signed(mask, width)


def _signed(mask: int, width: int) -> int:
    mask &= (1 << width) - 1
    return mask - (1 << width) if mask >= 1 << (width - 1) else mask


def _wrap(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Convert an integer tensor to ``dtype`` keeping the low bits (two's-complement wrap)."""
    if x.dtype == dtype:
        return x
    if x.is_floating_point() or x.dtype == torch.bool:
        raise ConfigError(f"mask: expected an integer tensor, got {x.dtype}")
    width = _WIDTH[dtype]
    if _WIDTH.get(x.dtype, 64) > width:
        half = 1 << (width - 1)
        x = torch.remainder(x.to(torch.int64) + half, 1 << width) - half
    return x.to(dtype)


def _as_mask(mask: int | Tensor, words: Tensor) -> int | Tensor:
    if words.dtype not in _WIDTH:
        raise ConfigError(f"words: expected an integer tensor, got {words.dtype}")
    if isinstance(mask, Tensor):
        return _wrap(mask.to(words.device), words.dtype)
    return _signed(int(mask), _WIDTH[words.dtype])


def flip_bits(words: Tensor, mask: int | Tensor) -> Tensor:
    """XOR ``mask`` into ``words`` (new tensor). ``mask`` is an int (unsigned or signed) or an
    integer tensor broadcastable to ``words``; e.g. ``flip_bits(w, 1 << 31)`` flips FP32 sign."""
    return torch.bitwise_xor(words, _as_mask(mask, words))


def set_bits(words: Tensor, mask: int | Tensor) -> Tensor:
    """OR ``mask`` into ``words`` (stuck-at-1), e.g. ``set_bits(w, 0b100)``."""
    return torch.bitwise_or(words, _as_mask(mask, words))


def clear_bits(words: Tensor, mask: int | Tensor) -> Tensor:
    """Clear the ``mask`` bits of ``words`` (stuck-at-0), e.g. ``clear_bits(w, 0b100)``."""
    return torch.bitwise_and(words, torch.bitwise_not(torch.as_tensor(
        _as_mask(mask, words), dtype=words.dtype, device=words.device)))


class NumberFormat:
    """Base class: a storage format with ``name``, ``bits`` and bit ``field`` layout.

    ``encode(values) -> words``, ``decode(words) -> float32``, ``quantize(t)`` = what is stored.
    Float formats need no binding (``bind``/``select`` return ``self``); INT8 needs scales.
    """

    name: str
    bits: int
    word_dtype: torch.dtype
    _fields: tuple[tuple[str, int, int], ...]  # (field, lowest bit, highest bit)

    def field(self, bit: int) -> str:
        """Field of ``bit``: "sign" | "exponent" | "mantissa" | "magnitude"."""
        for name, lo, hi in self._fields:
            if lo <= int(bit) <= hi:
                return name
        raise ConfigError(f"bit: expected 0..{self.bits - 1} for {self.name}, got {bit}")

    def bits_of_field(self, field: str) -> tuple[int, ...]:
        """Ascending bit positions of ``field``, e.g. fp32 "sign" -> (31,)."""
        for name, lo, hi in self._fields:
            if name == field:
                return tuple(range(lo, hi + 1))
        names = ", ".join(f[0] for f in self._fields)
        raise ConfigError(f"field: expected one of {names} for {self.name}, got {field!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        """Field names from the most significant down."""
        return tuple(f[0] for f in reversed(self._fields))

    @property
    def is_bound(self) -> bool:
        """True when ``encode``/``decode`` can run (always for float formats)."""
        return True

    def bind(self, tensor: Tensor, axis: int | None = 0,
             kernel_ids: Tensor | None = None) -> NumberFormat:
        """Format bound to ``tensor`` (INT8 learns its scales); float formats return self."""
        return self

    def select(self, index: int | Sequence[int] | Tensor) -> NumberFormat:
        """Format for the elements at flat ``index`` of the bound tensor (float: self)."""
        return self

    def encode(self, values: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, words: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def quantize(self, tensor: Tensor, axis: int | None = 0,
                 kernel_ids: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class FloatFormat(NumberFormat):
    """IEEE-754 style binary float format (fp32, fp16, bf16).

    >>> get_format("bf16").encode(torch.tensor(1.0)).item() == 0x3F80
    True
    """

    def __init__(self, name: str, bits: int, exp_bits: int, dtype: torch.dtype,
                 word_dtype: torch.dtype) -> None:
        self.name, self.bits, self.dtype, self.word_dtype = name, bits, dtype, word_dtype
        self.exp_bits, self.man_bits = exp_bits, bits - 1 - exp_bits
        m = self.man_bits
        self._fields = (("mantissa", 0, m - 1), ("exponent", m, bits - 2),
                        ("sign", bits - 1, bits - 1))

    def encode(self, values: Tensor) -> Tensor:
        """Stored words (RNE rounding; overflow -> inf). For fp32 this is a view of ``values``."""
        v = values.detach()
        if v.dtype == self.dtype:
            return v.view(self.word_dtype)
        v32 = v.to(torch.float32)
        if self.dtype == torch.float32:
            return v32.view(torch.int32)
        w = v32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        sign, man = (w >> 31) & 1, w & 0x7FFFFF
        if self.dtype == torch.bfloat16:  # round to nearest even on the upper 16 bits
            out = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
            hi = w >> 16
            nan = torch.where((hi & 0x7F) == 0, hi | 0x0040, hi)
        else:
            out = v32.to(torch.float16).view(torch.int16).to(torch.int64)
            pay = man >> 13
            nan = (sign << 15) | 0x7C00 | torch.where(pay == 0, 0x0200, pay)
        out = torch.where(torch.isnan(v32), nan, out)
        return _wrap(out, self.word_dtype)

    def decode(self, words: Tensor) -> Tensor:
        """float32 values of ``words`` (exact; NaN payloads kept)."""
        w = _wrap(words, self.word_dtype)
        if self.dtype == torch.float32:
            return w.view(torch.float32)
        w64 = w.to(torch.int64) & 0xFFFF
        if self.dtype == torch.bfloat16:
            return _wrap(w64 << 16, torch.int32).view(torch.float32)
        out = w.view(torch.float16).to(torch.float32)
        is_nan = ((w64 & 0x7C00) == 0x7C00) & ((w64 & 0x3FF) != 0)
        nan = ((w64 >> 15) << 31) | 0x7F800000 | ((w64 & 0x3FF) << 13)
        return torch.where(is_nan, _wrap(nan, torch.int32).view(torch.float32), out)

    def quantize(self, tensor: Tensor, axis: int | None = 0,
                 kernel_ids: Tensor | None = None) -> Tensor:
        """float32 values actually stored in this format (identity for fp32)."""
        if self.dtype == torch.float32:
            return tensor.to(torch.float32)
        return self.decode(self.encode(tensor))


class Int8Format(NumberFormat):
    """Symmetric INT8: ``q = clamp(round(w / scale), -127, 127)``, ``scale = max|w| / 127``
    (per tensor, or per kernel for "int8-channel"; a zero scale becomes float32 eps), stored
    as int8 two's complement: bit 7 is the sign bit of ``q``, bits 6..0 "magnitude".

    Unbound formats cannot encode: ``b = fmt.bind(w, axis)`` learns the scales of weight ``w``
    (per kernel along ``axis``, or per id of ``kernel_ids``, an int tensor broadcastable to
    ``w``); ``b.quantize(w)`` gives the stored values and ``b.select(flat_index)`` a format for
    those elements only (what ``apply_fault`` needs). ``encode`` clamps to -128..127, so words
    produced by faults (e.g. -128) round-trip. Keep the bound format of the original weights:
    re-binding to already quantized values can move a scale by one float32 ulp.

    >>> b = get_format("int8-channel").bind(torch.tensor([[1.0, -0.5], [0.0, 2.0]]), axis=0)
    >>> b.encode(b.quantize(torch.tensor([[1.0, -0.5], [0.0, 2.0]]))).tolist()
    [[127, -64], [0, 127]]
    """

    def __init__(self, per_channel: bool = False, scale: Tensor | None = None,
                 shape: torch.Size | None = None) -> None:
        self.per_channel = per_channel
        self.name = "int8-channel" if per_channel else "int8"
        self.bits, self.word_dtype = 8, torch.int8
        self._fields = (("magnitude", 0, 6), ("sign", 7, 7))
        self.scale = scale
        self.shape = shape

    @property
    def is_bound(self) -> bool:
        return self.scale is not None

    def _need_scale(self) -> Tensor:
        if self.scale is None:
            raise ConfigError(f"format: {self.name} is unbound; call fmt.bind(tensor, axis) first")
        return self.scale

    def bind(self, tensor: Tensor, axis: int | None = 0,
             kernel_ids: Tensor | None = None) -> Int8Format:
        """Bound copy with scales from ``tensor`` (per kernel if "int8-channel")."""
        t = tensor.detach().to(torch.float32).abs()
        if not self.per_channel or t.dim() == 0 or (axis is None and kernel_ids is None):
            amax = t.max() if t.numel() else torch.zeros((), device=t.device)
        elif kernel_ids is not None:
            ids = kernel_ids.to(device=t.device, dtype=torch.int64)
            full = ids.expand(t.shape).reshape(-1)
            n = int(full.max()) + 1 if full.numel() else 1
            per_k = torch.zeros(n, device=t.device).scatter_reduce(
                0, full, t.reshape(-1), "amax", include_self=True)
            amax = per_k[ids]
        else:
            ax = axis % t.dim()
            dims = [d for d in range(t.dim()) if d != ax]
            amax = t.amax(dim=dims, keepdim=True) if dims else t
        eps = torch.finfo(torch.float32).eps
        return Int8Format(self.per_channel, torch.clamp_min(amax / 127.0, eps), t.shape)

    def select(self, index: int | Sequence[int] | Tensor) -> Int8Format:
        """Format whose scale matches the elements at flat ``index`` of the bound tensor."""
        scale = self._need_scale()
        idx = torch.as_tensor(index, dtype=torch.int64, device=scale.device)
        if scale.numel() == 1:
            return Int8Format(self.per_channel, scale.reshape(()).expand(idx.shape))
        if self.shape is None:
            raise ConfigError("format: select() needs a format bound to a whole tensor")
        shape = tuple(self.shape)
        exp = scale.contiguous().expand(shape)
        offset = torch.zeros_like(idx)
        rest = idx
        for d in range(len(shape) - 1, -1, -1):
            offset = offset + (rest % shape[d]) * exp.stride(d)
            rest = rest // shape[d]
        return Int8Format(self.per_channel, scale.contiguous().reshape(-1)[offset])

    def _check(self, shape: torch.Size) -> Tensor:
        scale = self._need_scale()
        if torch.broadcast_shapes(shape, scale.shape) != shape:
            raise ConfigError(f"values: shape {tuple(shape)} does not match the bound scales "
                              f"{tuple(scale.shape)}; use fmt.select(flat_index)")
        return scale

    def encode(self, values: Tensor) -> Tensor:
        """int8 words ``clamp(round(v / scale), -128, 127)`` (NaN -> 0)."""
        scale = self._check(values.shape)
        q = torch.round(values.detach().to(torch.float32) / scale.to(values.device))
        return torch.nan_to_num(q, nan=0.0).clamp(-128, 127).to(torch.int8)

    def decode(self, words: Tensor) -> Tensor:
        """float32 values ``q * scale``."""
        scale = self._check(words.shape)
        return _wrap(words, torch.int8).to(torch.float32) * scale.to(words.device)

    def quantize(self, tensor: Tensor, axis: int | None = 0,
                 kernel_ids: Tensor | None = None) -> Tensor:
        """Stored float32 values of ``tensor`` (binds to it first when unbound)."""
        b = self if self.is_bound else self.bind(tensor, axis, kernel_ids)
        scale = b._check(tensor.shape).to(tensor.device)
        return torch.round(tensor.detach().to(torch.float32) / scale).clamp(-127, 127) * scale

    def __repr__(self) -> str:
        state = "bound" if self.is_bound else "unbound"
        return f"Int8Format({self.name!r}, {state})"


FP32 = FloatFormat("fp32", 32, 8, torch.float32, torch.int32)
FP16 = FloatFormat("fp16", 16, 5, torch.float16, torch.int16)
BF16 = FloatFormat("bf16", 16, 8, torch.bfloat16, torch.int16)


def get_format(name: str | NumberFormat, **params: object) -> NumberFormat:
    """Format by name: "fp32" | "fp16" | "bf16" | "int8" | "int8-channel".

    ``params`` (INT8 only): ``scale`` (float or tensor) gives an already bound format.

    >>> get_format("fp16").bits
    16
    """
    if isinstance(name, NumberFormat):
        return name
    key = str(name).lower()
    if key not in FORMAT_NAMES:
        raise ConfigError(f"format: expected one of {', '.join(FORMAT_NAMES)}, got {name!r}")
    allowed = {"scale"} if key.startswith("int8") else set()
    bad = sorted(set(params) - allowed)
    if bad:
        raise ConfigError(f"format: unexpected parameter {bad[0]!r} for {key}")
    if key.startswith("int8"):
        scale = params.get("scale")
        if scale is not None:
            scale = torch.as_tensor(scale, dtype=torch.float32)
        return Int8Format(per_channel=key == "int8-channel", scale=scale)  # type: ignore[arg-type]
    return {"fp32": FP32, "fp16": FP16, "bf16": BF16}[key]
