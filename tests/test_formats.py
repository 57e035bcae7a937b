"""Number formats and bit ops against struct / plain-int reference implementations."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipguard.errors import FlipguardError
from flipguard.faults import apply_bits, clear_bits, flip_bits, get_format, set_bits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = ("flip", "stuck-at-0", "stuck-at-1")
SPECIAL32 = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
             0x7F800001, 0x7FBFFFFF, 0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF,
             0x3F800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x33800000, 0x33000000,
             0x33000001, 0x387FC000, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7F8000]


def _f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


def _u32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _is_nan32(u: int) -> bool:
    return (u & 0x7F800000) == 0x7F800000 and (u & 0x7FFFFF) != 0


# --- references: pattern (unsigned int) in, pattern out ---------------------------------------
def ref_encode(name: str, u: int) -> int:
    if name == "fp32":
        return u
    if name == "fp16":
        if _is_nan32(u):
            payload = (u & 0x7FFFFF) >> 13
            return ((u >> 31) << 15) | 0x7C00 | (payload if payload else 0x0200)
        try:
            return struct.unpack("<H", struct.pack("<e", _f32(u)))[0]
        except OverflowError:
            return ((u >> 31) << 15) | 0x7C00
    if _is_nan32(u):  # bf16
        return (u >> 16) | (0 if (u >> 16) & 0x7F else 0x0040)
    upper, lower = u >> 16, u & 0xFFFF
    if lower > 0x8000 or (lower == 0x8000 and upper & 1):
        upper += 1
    return upper & 0xFFFF


def ref_decode(name: str, h: int) -> int:
    if name == "fp32":
        return h
    if name == "bf16":
        return h << 16
    if (h & 0x7C00) == 0x7C00 and (h & 0x3FF):
        return ((h >> 15) << 31) | 0x7F800000 | ((h & 0x3FF) << 13)
    return _u32(struct.unpack("<e", struct.pack("<H", h))[0])


def ref_op(word: int, mask: int, kind: str) -> int:
    return {"flip": word ^ mask, "stuck-at-0": word & ~mask, "stuck-at-1": word | mask}[kind]


def _patterns(words: list[int], seed: int, n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rand = rng.integers(0, 2**32, n, dtype=np.uint64)
    small = rng.integers(0, 2**24, n // 4, dtype=np.uint64) | (
        rng.integers(0, 2, n // 4, dtype=np.uint64) << np.uint64(31))
    # values near fp16/bf16 rounding boundaries: random fp32 with few exponents
    mid = (rng.integers(0x33000000, 0x47800000, n // 4, dtype=np.uint64))
    return np.concatenate([np.array(SPECIAL32 + words, dtype=np.uint64), rand, small,
                           mid.astype(np.uint64)]).astype(np.uint32)


def _values(pat: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(pat.view(np.int32).copy()).view(torch.float32).to(device)


def _pattern_of(t: torch.Tensor) -> np.ndarray:
    return t.cpu().contiguous().view(torch.int32).numpy().view(np.uint32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
@settings(max_examples=12, deadline=None)
@given(words=st.lists(st.integers(0, 2**32 - 1), max_size=16), seed=st.integers(0, 2**31))
def test_float_bit_ops_match_struct_reference(name, device, words, seed):
    fmt = get_format(name)
    pat = _patterns(words, seed)
    values = _values(pat, device)
    enc = [ref_encode(name, int(u)) for u in pat]
    got_words = fmt.encode(values).cpu().numpy().astype(np.int64) & ((1 << fmt.bits) - 1)
    assert got_words.tolist() == enc
    masks = torch.tensor([1 << b for b in range(fmt.bits)], device=device)[:, None]
    for kind in KINDS:
        out = apply_bits(values, masks, kind, fmt)
        assert out.dtype == torch.float32 and out.device.type == device
        got = _pattern_of(out)
        ref = [[ref_decode(name, ref_op(h, 1 << b, kind)) for h in enc] for b in range(fmt.bits)]
        np.testing.assert_array_equal(got, np.array(ref, dtype=np.uint32))


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_decode_every_word_and_quantize(name):
    fmt = get_format(name)
    words = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    got = _pattern_of(fmt.decode(words))
    ref = [ref_decode(name, int(w) & 0xFFFF) for w in words]
    np.testing.assert_array_equal(got, np.array(ref, dtype=np.uint32))
    # decode is exact: re-encoding gives back every word (NaN payloads included)
    assert torch.equal(fmt.encode(fmt.decode(words)), words)
    np.testing.assert_array_equal(_pattern_of(fmt.quantize(fmt.decode(words))), got)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_torch_bfloat16_and_half_rounding_is_rne(seed):
    """torch's own conversion rounds to nearest even for non-NaN values, like our encode."""
    pat = _patterns([], seed, n=400)
    pat = pat[[not _is_nan32(int(u)) for u in pat]]
    values = _values(pat, "cpu")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ref = [ref_encode(name, int(u)) for u in pat]
        for torch_words in (values.to(dtype).view(torch.int16),  # vectorised kernel
                            torch.stack([v.to(dtype) for v in values[:40]]).view(torch.int16)):
            got = (torch_words.numpy().astype(np.int64) & 0xFFFF).tolist()
            assert got == ref[: len(got)]
        q = get_format(name).quantize(values)
        assert torch.equal(q.view(torch.int32), values.to(dtype).float().view(torch.int32))


def _ref_int8(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) by plain Python/float32 arithmetic; scale broadcast to w's shape."""
    w = w.astype(np.float32)
    eps = np.float32(np.finfo(np.float32).eps)
    if axis is None:
        scale = np.full(w.shape, max(np.float32(np.abs(w).max()) / np.float32(127), eps),
                        dtype=np.float32)
    else:
        scale = np.empty_like(w)
        for k in range(w.shape[axis]):
            sl = np.take(w, k, axis=axis)
            idx = [slice(None)] * w.ndim
            idx[axis] = k
            scale[tuple(idx)] = max(np.float32(np.abs(sl).max()) / np.float32(127), eps)
    q = np.array([max(-127, min(127, round(float(np.float32(a) / np.float32(s)))))
                  for a, s in zip(w.ravel(), scale.ravel(), strict=True)], dtype=np.int64)
    return q.reshape(w.shape), scale


def _twos(u: int) -> int:
    u &= 0xFF
    return u - 256 if u >= 128 else u


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,axis", [("int8", None), ("int8-channel", 0), ("int8-channel", 1)])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), zero_channel=st.booleans())
def test_int8_quantize_and_bit_ops_match_int_reference(name, axis, device, seed, zero_channel):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((3, 4, 2)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    if zero_channel:
        w[:, 1] = 0.0
    q_ref, scale_ref = _ref_int8(w, axis)
    wt = torch.from_numpy(w).to(device)
    fmt = get_format(name).bind(wt, axis=axis if axis is not None else 0)
    stored = fmt.quantize(wt)
    np.testing.assert_array_equal(
        stored.cpu().numpy(), (q_ref.astype(np.float32) * scale_ref).astype(np.float32))
    assert fmt.encode(stored).cpu().numpy().tolist() == q_ref.tolist()
    flat = stored.reshape(-1)
    idx = torch.arange(flat.numel(), device=device)
    efmt = fmt.select(idx)
    np.testing.assert_array_equal(efmt.scale.cpu().numpy(), scale_ref.ravel())
    masks = torch.tensor([1 << b for b in range(8)], device=device)[:, None]
    for kind in KINDS:
        got = apply_bits(flat, masks, kind, efmt).cpu().numpy()
        ref = np.array([[np.float32(_twos(ref_op(int(q) & 0xFF, 1 << b, kind))) * s
                         for q, s in zip(q_ref.ravel(), scale_ref.ravel(), strict=True)]
                        for b in range(8)], dtype=np.float32)
        np.testing.assert_array_equal(got, ref)


def test_int8_words_round_trip_including_minus_128():
    fmt = get_format("int8", scale=0.25)
    words = torch.arange(-128, 128, dtype=torch.int8)
    vals = fmt.decode(words)
    assert vals.tolist() == [0.25 * q for q in range(-128, 128)]
    assert torch.equal(fmt.encode(vals), words)
    assert fmt.quantize(torch.tensor([100.0, -100.0])).tolist() == [31.75, -31.75]


def test_int8_kernel_ids_binding_and_errors():
    w = torch.tensor([[1.0, -4.0], [2.0, 0.5], [-8.0, 1.0]])
    ids = torch.tensor([[0], [1], [0]])
    b = get_format("int8-channel").bind(w, kernel_ids=ids)
    assert b.scale.reshape(-1).tolist() == pytest.approx([8 / 127, 2 / 127, 8 / 127])
    with pytest.raises(FlipguardError, match="unbound"):
        get_format("int8").encode(w)
    with pytest.raises(FlipguardError, match="select"):
        b.encode(torch.tensor(1.0).expand(3, 1, 1))


@pytest.mark.parametrize("dtype,bits", [(torch.int8, 8), (torch.int16, 16), (torch.int32, 32)])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_helpers_on_words_match_python_ints(dtype, bits, seed):
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    words = rng.integers(lo, hi, 300)
    masks = rng.integers(0, 1 << bits, 300, dtype=np.uint64)
    wt = torch.tensor(words, dtype=dtype)
    mask_t = torch.tensor(masks.astype(np.int64))  # unsigned masks as int64: wrapped
    for fn, kind in ((flip_bits, "flip"), (clear_bits, "stuck-at-0"), (set_bits, "stuck-at-1")):
        ref = [_signed(ref_op(int(w) & ((1 << bits) - 1), int(m), kind), bits)
               for w, m in zip(words, masks, strict=True)]
        out = fn(wt, mask_t)
        assert out.dtype == dtype and out.tolist() == ref
        scalar = fn(wt, int(masks[0]))
        assert scalar.tolist() == [
            _signed(ref_op(int(w) & ((1 << bits) - 1), int(masks[0]), kind), bits) for w in words]


def _signed(u: int, bits: int) -> int:
    u &= (1 << bits) - 1
    return u - (1 << bits) if u >= 1 << (bits - 1) else u


@pytest.mark.parametrize("name,table", [
    ("fp32", {31: "sign", **{b: "exponent" for b in range(23, 31)},
              **{b: "mantissa" for b in range(23)}}),
    ("fp16", {15: "sign", **{b: "exponent" for b in range(10, 15)},
              **{b: "mantissa" for b in range(10)}}),
    ("bf16", {15: "sign", **{b: "exponent" for b in range(7, 15)},
              **{b: "mantissa" for b in range(7)}}),
    ("int8", {7: "sign", **{b: "magnitude" for b in range(7)}}),
    ("int8-channel", {7: "sign", **{b: "magnitude" for b in range(7)}}),
])
def test_field_maps(name, table):
    fmt = get_format(name)
    assert fmt.name == name and fmt.bits == len(table)
    assert {b: fmt.field(b) for b in range(fmt.bits)} == table
    for field in set(table.values()):
        assert fmt.bits_of_field(field) == tuple(sorted(b for b, f in table.items() if f == field))
    with pytest.raises(FlipguardError, match="bit"):
        fmt.field(fmt.bits)
    with pytest.raises(FlipguardError, match="field"):
        fmt.bits_of_field("exponent" if name.startswith("int8") else "magnitude")


def test_get_format_errors_and_fp32_identity():
    with pytest.raises(FlipguardError, match="format: expected one of fp32"):
        get_format("fp64")
    with pytest.raises(FlipguardError, match="scale"):
        get_format("fp16", scale=1.0)
    x = torch.tensor([1.5, -math.inf, 3e-42])
    assert torch.equal(get_format("FP32").quantize(x), x)
    # bf16 boundary literals: 1 + 2^-8 ties to even (down), 1 + 3 * 2^-8 ties up
    bf = get_format("bf16").quantize(torch.tensor([1 + 2**-8, 1 + 3 * 2**-8]))
    assert bf.tolist() == [1.0, 1 + 2**-6]
