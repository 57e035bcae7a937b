"""Fault models: Fault records, apply_fault/apply_bits, stuck-at no-ops, MBUs, storage."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flipguard.errors import FlipguardError
from flipguard.faults import (
    Fault,
    FaultSite,
    apply_bits,
    apply_fault,
    fault_from_dict,
    fault_to_dict,
    get_format,
    is_noop,
    mbu,
    noop_mask,
)

faults = st.builds(
    Fault,
    target=st.sampled_from(["weight", "bias", "activation"]),
    layer=st.sampled_from(["encoder.0", "decoder.3", "fc"]),
    index=st.integers(0, 10**8),
    bits=st.lists(st.integers(0, 31), min_size=1, max_size=4, unique=True).map(tuple),
    kind=st.sampled_from(["flip", "stuck-at-0", "stuck-at-1"]),
)


def _u32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _f32(u: int) -> float:
    return struct.unpack("<f", struct.pack("<I", u))[0]


@settings(max_examples=60, deadline=None)
@given(f=faults)
def test_fault_record_storage_round_trip(f):
    assert f.bits == tuple(sorted(f.bits))
    for style in ("list", "str"):
        d = json.loads(json.dumps(fault_to_dict(f, bits_as=style)))
        assert fault_from_dict(d) == f
    assert Fault.from_site(f.site, f.kind, bits=f.bits) == f
    assert f.site == FaultSite(f.target, f.layer, f.index, min(f.bits))
    assert f.mask == sum(1 << b for b in f.bits)


def test_fault_is_hashable_orderable_and_validated():
    a = Fault("weight", "fc", 3, [5, 1])
    b = Fault("weight", "fc", 3, (1, 5))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert sorted([Fault("weight", "fc", 9, (0,)), Fault("bias", "fc", 1, (0,)), a]) == [
        Fault("bias", "fc", 1, (0,)), a, Fault("weight", "fc", 9, (0,))]
    for bits in ("3, 4", "[4, 3]", [3, 4]):
        d = {"target": "bias", "layer": "x", "index": 2, "bits": bits}
        assert fault_from_dict(d) == Fault("bias", "x", 2, (3, 4), "flip")
    for bad, field in [(dict(target="grad"), "target"), (dict(kind="stuck-at-2"), "kind"),
                       (dict(bits=()), "bits"), (dict(bits=(2, 2)), "bits"),
                       (dict(index=-1), "index")]:
        kw = {"target": "weight", "layer": "fc", "index": 0, "bits": (1,), **bad}
        with pytest.raises(FlipguardError, match=field):
            Fault(**kw)
    with pytest.raises(FlipguardError, match="bits: expected 0..15"):
        apply_fault(torch.tensor(1.0), Fault("weight", "fc", 0, (16,)), "fp16")
    with pytest.raises(FlipguardError, match="'index'"):
        fault_from_dict({"target": "weight", "layer": "fc", "bits": [1]})


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), f=faults)
def test_apply_fault_fp32_matches_struct_reference(seed, f):
    rng = np.random.default_rng(seed)
    vals = (rng.standard_normal(64) * 10.0 ** rng.integers(-45, 38, 64)).astype(np.float32)
    vals[:4] = [0.0, -0.0, np.inf, 1e-45]
    t = torch.from_numpy(vals)
    before = t.clone()
    out = apply_fault(t, f, get_format("fp32"))
    assert torch.equal(t, before)  # pure: the input is untouched
    got = out.view(torch.int32).numpy().view(np.uint32).tolist()
    mask = sum(1 << b for b in f.bits)
    for x, g in zip(vals.tolist(), got, strict=True):
        u = _u32(x)
        want = {"flip": u ^ mask, "stuck-at-0": u & ~mask, "stuck-at-1": u | mask}[f.kind]
        assert g == want
        y = _f32(want)
        assert y != y or y == _f32(g)


def test_apply_fault_known_values_per_format():
    one = torch.tensor(1.0)
    assert apply_fault(one, Fault("weight", "l", 0, (30,)), "fp32").item() == float("inf")
    assert apply_fault(one, Fault("weight", "l", 0, (15,)), "fp16").item() == -1.0
    assert apply_fault(one, Fault("weight", "l", 0, (14,)), "fp16").item() == float("inf")
    assert apply_fault(one, Fault("weight", "l", 0, (6,)), "bf16").item() == 1.5
    assert apply_fault(one, Fault("weight", "l", 0, (0,)), "fp16").item() == 1 + 2**-10
    w = torch.tensor([[0.6, -1.0], [2.0, 0.25]])
    fmt = get_format("int8-channel").bind(w, axis=0)
    stored = fmt.quantize(w).flatten()
    efmt = fmt.select(torch.tensor([0, 3]))
    out = apply_fault(stored[[0, 3]], Fault("weight", "l", 0, (7,)), efmt)
    # q = 76 (scale 1/127) -> 76 - 128; q = 16 (scale 2/127) -> 16 - 128
    assert out.tolist() == pytest.approx([-52 / 127, -112 * 2 / 127])
    out = apply_fault(stored[[0, 3]], Fault("weight", "l", 0, (0, 1), "stuck-at-1"), efmt)
    assert out.tolist() == pytest.approx([79 / 127, 19 * 2 / 127])


def test_apply_fault_keeps_dtype_and_device():
    x16 = torch.tensor([1.0, -2.0], dtype=torch.float16)
    out = apply_fault(x16, Fault("weight", "l", 0, (15,)), "fp16")
    assert out.dtype == torch.float16 and out.tolist() == [-1.0, 2.0]
    x64 = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    out = apply_fault(x64, Fault("weight", "l", 0, (31,)), "fp32")
    assert out.dtype == torch.float64 and out.tolist() == [-3.0] and not out.requires_grad
    assert apply_fault(torch.tensor(2.0), Fault("weight", "l", 0, (31,))).shape == ()


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "int8"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_stuck_at_noop_detection_matches_stored_bits(name, seed):
    rng = np.random.default_rng(seed)
    vals = torch.from_numpy((rng.standard_normal(200) * 3).astype(np.float32))
    fmt = get_format(name)
    stored = fmt.quantize(vals)
    if name == "int8":
        bound = fmt.bind(vals)
        stored, fmt = bound.quantize(vals), bound.select(torch.arange(200))
    words = fmt.encode(stored).to(torch.int64) & ((1 << fmt.bits) - 1)
    for b in range(fmt.bits):
        bit = ((words >> b) & 1).bool()
        assert torch.equal(noop_mask(stored, 1 << b, "stuck-at-0", fmt), ~bit)
        assert torch.equal(noop_mask(stored, 1 << b, "stuck-at-1", fmt), bit)
        assert not noop_mask(stored, 1 << b, "flip", fmt).any()
        # a no-op really leaves the value unchanged; an effective stuck-at changes it
        out = apply_bits(stored, 1 << b, "stuck-at-1", fmt)
        assert torch.equal(out[bit], stored[bit]) and not (out[~bit] == stored[~bit]).any()
    i = int(torch.nonzero(((words >> 3) & 1) == 1)[0])
    efmt = bound.select(i) if name == "int8" else fmt
    f1, f0 = (Fault("weight", "l", i, (3,), k) for k in ("stuck-at-1", "stuck-at-0"))
    assert is_noop(stored[i], f1, efmt) and not is_noop(stored[i], f0, efmt)
    assert not is_noop(stored[i], Fault("weight", "l", i, (3,)), efmt)


def test_mbu_adjacent_exhaustive():
    for width in (8, 16, 32):
        for bit in range(width):
            site = FaultSite("weight", "l", 0, bit)
            for k in range(1, width + 1):
                bits = mbu(site, k, word_bits=width)
                assert len(bits) == k and bit in bits
                assert bits == tuple(range(bits[0], bits[0] + k))
                assert 0 <= bits[0] and bits[-1] < width
                if bit + k <= width:
                    assert bits[0] == bit
    with pytest.raises(FlipguardError, match="k: expected"):
        mbu(FaultSite("weight", "l", 0, 1), 9, word_bits=8)


def test_mbu_random_is_seeded_and_uniform():
    site = FaultSite("weight", "l", 0, 4)
    a = [mbu(site, 3, "random", np.random.default_rng(s), word_bits=16) for s in range(2000)]
    b = [mbu(site, 3, "random", np.random.default_rng(s), word_bits=16) for s in range(2000)]
    assert a == b
    counts = np.zeros(16)
    for bits in a:
        assert len(set(bits)) == 3 and 4 in bits and all(0 <= x < 16 for x in bits)
        assert list(bits) == sorted(bits)
        counts[list(bits)] += 1
    assert counts[4] == 2000
    others = np.delete(counts, 4)  # each other bit expected 2000 * 2 / 15 times
    assert np.all(np.abs(others - 2000 * 2 / 15) < 5 * np.sqrt(2000 * 2 / 15))
    f = Fault.from_site(site, "flip", bits=mbu(site, 2, word_bits=16))
    out = apply_fault(torch.tensor(1.0), f, "fp16")
    assert get_format("fp16").encode(out).item() == 0x3C00 ^ 0x30
    with pytest.raises(FlipguardError, match="rng"):
        mbu(site, 2, "random")
