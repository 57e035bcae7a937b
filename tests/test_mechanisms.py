"""Protection mechanisms: exhaustive per-bit behaviour on several words vs struct oracles."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
import torch

from flipguard.errors import ConfigError
from flipguard.faults import get_format
from flipguard.harden.mechanisms import (
    CORRECTED,
    DETECTED,
    NO_ERROR,
    UNDETECTED,
    Protection,
    ReadPath,
    constant_bits,
    majority,
    range_clamp,
)

FP32 = get_format("fp32")


def u32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32(w: int) -> float:
    return struct.unpack("<f", struct.pack("<I", w & 0xFFFFFFFF))[0]


# normal, negative, subnormal, large, zero, negative zero, tiny negative
VALUES = [1.0, -2.5, 1e-40, 3.0e38, 0.0, -0.0, -7.25e-3, 0.1234]
WORDS = [u32(v) for v in VALUES]
KINDS = ("flip", "stuck-at-0", "stuck-at-1")


def faulty(word: int, bits: tuple[int, ...], kind: str) -> int:
    m = sum(1 << b for b in bits)
    return {"flip": word ^ m, "stuck-at-0": word & ~m, "stuck-at-1": word | m}[kind]


def read(path: ReadPath, golden: int, bits: tuple[int, ...], kind: str) -> tuple[int, int]:
    w, st = path.deliver(torch.tensor([golden]), torch.tensor([sum(1 << b for b in bits)]),
                         kind)
    return int(w.item()), int(st.item())


def read_many(path: ReadPath, cases: list[tuple[int, tuple[int, ...]]],
              kind: str) -> list[tuple[int, int]]:
    """Vectorised ``read`` over (golden, bits) cases (path of one word, broadcast)."""
    g = torch.tensor([c[0] for c in cases])
    m = torch.tensor([sum(1 << b for b in c[1]) for c in cases])
    w, st = path.deliver(g, m, kind)
    return list(zip(w.tolist(), st.tolist(), strict=True))


def singles_and_pairs():
    return [(b,) for b in range(32)] + list(itertools.combinations(range(32), 2))[::5]


@pytest.mark.parametrize("kind", KINDS)
def test_tmr_corrects_exactly_its_bits(kind: str) -> None:
    prot = (30, 29, 31)
    path = ReadPath.build([Protection("tmr", "fc", bits=prot)], 1)
    cases = list(itertools.product(WORDS, singles_and_pairs()))
    for (g, bits), (w, st) in zip(cases, read_many(path, cases, kind), strict=True):
        bad = faulty(g, bits, kind)
        keep = sum(1 << b for b in prot)
        expect = (bad & ~keep) | (g & keep)  # protected bits restored, others as stored
        assert w == expect
        if bad == g:
            assert st == NO_ERROR
        else:
            assert st == (CORRECTED if expect == g else UNDETECTED)


def test_majority_is_bitwise_two_of_three() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 2**31, (50,), generator=gen) for _ in range(3))
    got = majority(a, b, c).tolist()
    for x, y, z, m in zip(a.tolist(), b.tolist(), c.tolist(), got, strict=True):
        assert m == sum(1 << i for i in range(31)
                        if ((x >> i) & 1) + ((y >> i) & 1) + ((z >> i) & 1) >= 2)


@pytest.mark.parametrize("policy", ["zero", "reload"])
def test_parity_detects_odd_flips_in_group(policy: str) -> None:
    group = (31, 30, 29, 28, 23)
    path = ReadPath.build([Protection("parity", "fc", bits=group, policy=policy)], 1)
    cases = list(itertools.product(WORDS, singles_and_pairs()))
    for (g, bits), (w, st) in zip(cases, read_many(path, cases, "flip"), strict=True):
        bad = faulty(g, bits, "flip")
        odd = sum(1 for b in bits if b in group) % 2 == 1
        if odd and policy == "zero":
            assert (w, st) == (0, DETECTED)
        elif odd:
            assert (w, st) == (g, CORRECTED)
        else:  # even number of group flips (or none): passes through undetected
            assert (w, st) == (bad, UNDETECTED)


@pytest.mark.parametrize("policy", ["zero", "reload"])
def test_ecc_corrects_singles_detects_doubles(policy: str) -> None:
    path = ReadPath.build([Protection("ecc", "fc", policy=policy)], 1)
    for kind in KINDS:
        cases = [(g, (b,)) for g in WORDS for b in range(32)]
        for (g, bits), (w, st) in zip(cases, read_many(path, cases, kind), strict=True):
            assert w == g
            assert st == (NO_ERROR if faulty(g, bits, kind) == g else CORRECTED)
    cases = [(g, bits) for g in WORDS for bits in itertools.combinations(range(32), 2)]
    for (g, _), got in zip(cases, read_many(path, cases, "flip"), strict=True):
        assert got == ((0, DETECTED) if policy == "zero" else (g, CORRECTED))


def test_ecc_fp16_words() -> None:
    fp16 = get_format("fp16")
    path = ReadPath.build([Protection("ecc", "fc")], 1, fmt=fp16)
    g = int(fp16.encode(torch.tensor([-1.5])).item()) & 0xFFFF
    for b in range(16):
        assert read(path, g, (b,), "flip") == (g, CORRECTED)
    assert Protection("ecc", "fc").cost_bits(10, 16) == 60  # Hamming(22,16) + parity: 6 bits


def ref_clamp(value: float, lo: float, hi: float) -> float:
    if math.isnan(value):
        value = 0.0
    elif lo <= value <= hi:
        return value
    return min(max(value, lo), hi)


def test_range_clamps_every_single_flip() -> None:
    lo, hi = -2.5, 1.0
    path = ReadPath.build([Protection("range", "fc", lo=lo, hi=hi)], 1)
    for v in [1.0, -2.5, 1e-40, -7.25e-3, 0.1234, 0.0, -0.0]:
        g = u32(v)
        for b in range(32):
            bad = faulty(g, (b,), "flip")
            expect = ref_clamp(f32(bad), lo, hi)
            w, st = read(path, g, (b,), "flip")
            assert u32(f32(w)) == w and f32(w) == expect
            if lo <= f32(bad) <= hi:
                assert w == bad  # in range: bit-exact pass-through (keeps -0.0 vs 0.0)
            assert st == (CORRECTED if w == g else UNDETECTED)


def test_range_nan_handling() -> None:
    nan_word = torch.tensor([u32(float("nan"))])
    assert math.isnan(torch.clamp(torch.tensor([float("nan")]), -1.0, 1.0).item())  # torch keeps
    out = range_clamp(nan_word, 0.5, 1.0, FP32)
    assert f32(int(out.item())) == 0.5  # NaN -> 0 -> clamped into [0.5, 1]
    out = range_clamp(nan_word, -1.0, 1.0, FP32)
    assert f32(int(out.item())) == 0.0
    inf = range_clamp(torch.tensor([u32(float("inf"))]), -1.0, 1.0, FP32)
    assert f32(int(inf.item())) == 1.0


def test_constant_bits_vs_python() -> None:
    gen = torch.Generator().manual_seed(3)
    vals = (torch.rand(40, generator=gen) - 0.5) * 3.0  # |w| < 2: bit 30 always 0
    words = vals.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    mask, values = constant_bits(words, 32)
    ws = words.tolist()
    for b in range(32):
        col = {(w >> b) & 1 for w in ws}
        assert bool(mask >> b & 1) == (len(col) == 1)
        if len(col) == 1:
            assert (values >> b) & 1 == col.pop()
    assert mask >> 30 & 1 and not values >> 30 & 1


def test_invariant_forces_constant_bits() -> None:
    words = [u32(v) for v in (0.5, -1.25, 0.01, 1.9)]
    mask, values = constant_bits(torch.tensor(words), 32)
    bits = tuple(b for b in range(32) if mask >> b & 1)
    path = ReadPath.build([Protection("invariant", "fc", bits=bits, values=values)], 4)
    for i, g in enumerate(words):
        for b in range(32):
            w, st = path.select([i]).deliver(torch.tensor([g]), torch.tensor([1 << b]), "flip")
            assert int(st.item()) == (CORRECTED if b in bits else UNDETECTED)
            assert int(w.item()) == (g if b in bits else g ^ (1 << b))


def test_combination_order() -> None:
    g = u32(0.75)
    tmr_ecc = ReadPath.build([Protection("tmr", "fc", bits=(30,)), Protection("ecc", "fc")], 1)
    ecc = ReadPath.build([Protection("ecc", "fc")], 1)
    # TMR votes bit 30 back first, so ECC sees a single error and corrects it
    assert read(tmr_ecc, g, (30, 5), "flip") == (g, CORRECTED)
    assert read(ecc, g, (30, 5), "flip") == (0, DETECTED)
    # detected -> zero -> clamped into [lo, hi] last
    both = ReadPath.build([Protection("parity", "fc", bits=(30,)),
                           Protection("range", "fc", lo=0.5, hi=1.0)], 1)
    assert read(both, g, (30,), "flip") == (u32(0.5), DETECTED)
    # undetected by parity (bit outside group) but clamped by the range
    w, st = read(both, g, (29,), "flip")
    assert (f32(w), st) == (ref_clamp(f32(g ^ (1 << 29)), 0.5, 1.0), UNDETECTED)


def test_kernel_scoped_protections_and_fault_free_identity() -> None:
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(3, 4, generator=gen)
    golden = vals.view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
    kern = torch.arange(3).repeat_interleave(4)
    lo, hi = float(vals[1].min()), float(vals[1].max())
    mask, values = constant_bits(golden[kern == 2], 32)
    prots = [Protection("tmr", "fc", kernel=0, bits=(30,)),
             Protection("range", "fc", kernel=1, lo=lo, hi=hi),
             Protection("ecc", "fc", kernel=2),
             Protection("invariant", "fc", kernel=2,
                        bits=tuple(b for b in range(32) if mask >> b & 1), values=values)]
    path = ReadPath.build(prots, 12, kernel_of=kern)
    w, st = path.deliver(golden, torch.zeros(12, dtype=torch.int64), "flip")
    assert torch.equal(w, golden) and set(st.tolist()) == {NO_ERROR}
    w, st = path.deliver(golden, torch.full((12,), 1 << 30), "flip")
    assert st.tolist()[:4] == [CORRECTED] * 4 and st.tolist()[8:] == [CORRECTED] * 4
    assert not torch.equal(w[4:8], golden[4:8] ^ (1 << 30))  # kernel 1 gets clamped
    assert all(lo <= f32(x) <= hi for x in w[4:8].tolist())


def test_costs() -> None:
    assert Protection("tmr", "a", bits=(30, 29, 22)).cost_bits(1000) == 6000
    assert Protection("parity", "a", bits=(30,)).cost_bits(1000) == 1000
    assert Protection("ecc", "a").cost_bits(1000) == 7000
    assert Protection("ecc", "a").cost_bits(1000, 8) == 5000
    assert Protection("range", "a", lo=-1, hi=1).cost_bits(10**6) == 64
    assert Protection("invariant", "a", bits=(30,)).cost_bits(10**6) == 0
    assert Protection("invariant", "a", kernel=2, bits=(30,)).cost_bits(10**6) == 64


def test_protection_roundtrip_and_errors() -> None:
    p = Protection("parity", "enc.0", kernel=3, bits=(30, 23), policy="reload")
    assert Protection.from_dict(p.to_dict()) == p
    assert p.label == "parity[30,23](reload) enc.0.weight/k3"
    with pytest.raises(ConfigError, match="scheme"):
        Protection("crc", "a")
    with pytest.raises(ConfigError, match="bits"):
        Protection("tmr", "a")
    with pytest.raises(ConfigError, match="lo/hi"):
        Protection("range", "a", lo=1.0, hi=0.0)
    with pytest.raises(ConfigError, match="unknown field"):
        Protection.from_dict({"scheme": "ecc", "layer": "a", "colour": 1})
    with pytest.raises(ConfigError, match="one word code"):
        ReadPath.build([Protection("ecc", "a"), Protection("parity", "a", bits=(1,))], 2)
