"""SEC-DED (extended Hamming) code against a bit-by-bit reference over the whole codeword."""

from __future__ import annotations

import itertools
import struct

import pytest
import torch

from flipguard.errors import ConfigError
from flipguard.harden.ecc import CORRECTED, DETECTED, OK, SecDed, parity


def ref_layout(k: int) -> tuple[int, list[int]]:
    """(r, data positions) of the textbook Hamming layout: checks at powers of two."""
    r = 0
    while 2**r < k + r + 1:
        r += 1
    pos = [p for p in range(1, k + r + 1) if p not in {2**i for i in range(r)}]
    return r, pos


def ref_encode(d: int, k: int) -> list[int]:
    """Codeword bits cw[0..k+r]: cw[0] overall parity, cw[2^i] check bits, data elsewhere."""
    r, pos = ref_layout(k)
    cw = [0] * (k + r + 1)
    for j, p in enumerate(pos):
        cw[p] = (d >> j) & 1
    for i in range(r):
        q = 2**i
        cw[q] = sum(cw[p] for p in range(1, k + r + 1) if (p & q) and p != q) % 2
    cw[0] = sum(cw[1:]) % 2
    return cw


def ref_decode(cw: list[int], k: int) -> tuple[int, int]:
    """(data, status): syndrome = XOR of the positions holding a 1."""
    r, pos = ref_layout(k)
    cw = list(cw)
    s = 0
    for p in range(1, len(cw)):
        if cw[p]:
            s ^= p
    overall = sum(cw) % 2
    if s == 0 and overall == 0:
        status = OK
    elif overall == 1:
        if s < len(cw):
            cw[s] ^= 1  # s == 0 flips the overall bit itself
            status = CORRECTED
        else:
            status = DETECTED
    else:
        status = DETECTED
    return sum(cw[p] << j for j, p in enumerate(pos)), status


def split(cw: list[int], k: int) -> tuple[int, int]:
    """Reference codeword -> (data word, check word) as SecDed stores them."""
    r, pos = ref_layout(k)
    data = sum(cw[p] << j for j, p in enumerate(pos))
    check = sum(cw[2**i] << i for i in range(r)) | (cw[0] << r)
    return data, check


def f32(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


WORDS32 = [0, 0xFFFFFFFF, f32(1.0), f32(-2.5), f32(1e-40), f32(3.0e38), f32(-0.0), 0x12345678]


@pytest.mark.parametrize("k", [32, 16, 8])
def test_layout_and_encode_match_reference(k: int) -> None:
    code = SecDed(k)
    r, pos = ref_layout(k)
    assert code.r == r and code.check_bits == r + 1 and code.n == k + r + 1
    assert list(code.data_positions) == pos
    rng = torch.Generator().manual_seed(0)
    words = [w & ((1 << k) - 1) for w in WORDS32]
    words += torch.randint(0, 1 << k if k < 32 else 2**31, (20,), generator=rng).tolist()
    check = code.encode(torch.tensor(words))
    for d, c in zip(words, check.tolist(), strict=True):
        assert (d, c) == split(ref_encode(d, k), k)


def test_39_32_sizes() -> None:
    code = SecDed(32)
    assert (code.n, code.k, code.check_bits) == (39, 32, 7)


@pytest.mark.parametrize("k", [32, 16])
def test_all_single_and_double_errors_exhaustive(k: int) -> None:
    code = SecDed(k)
    n = code.n
    patterns = [(i,) for i in range(n)] + list(itertools.combinations(range(n), 2))
    assert len(patterns) == n + n * (n - 1) // 2  # 39 + 741 for k = 32
    for d in [w & ((1 << k) - 1) for w in WORDS32]:
        cw = ref_encode(d, k)
        datas, checks, expect = [], [], []
        for pat in patterns:
            bad = list(cw)
            for p in pat:
                bad[p] ^= 1
            dd, cc = split(bad, k)
            datas.append(dd)
            checks.append(cc)
            expect.append(ref_decode(bad, k))
        out, status = code.decode(torch.tensor(datas), torch.tensor(checks))
        got = list(zip(out.tolist(), status.tolist(), strict=True))
        assert got == expect
        # the promise of SEC-DED itself, independent of the reference decoder
        singles, doubles = got[:n], got[n:]
        assert all(st == CORRECTED and o == d for o, st in singles)
        assert all(st == DETECTED for _, st in doubles)


def test_triple_errors_match_reference() -> None:
    code = SecDed(32)
    d = f32(0.15625)
    cw = ref_encode(d, 32)
    pats = list(itertools.combinations(range(code.n), 3))[::7]
    datas, checks, expect = [], [], []
    for pat in pats:
        bad = list(cw)
        for p in pat:
            bad[p] ^= 1
        dd, cc = split(bad, 32)
        datas.append(dd)
        checks.append(cc)
        expect.append(ref_decode(bad, 32))
    out, status = code.decode(torch.tensor(datas), torch.tensor(checks))
    assert list(zip(out.tolist(), status.tolist(), strict=True)) == expect
    # triple errors are never reported clean: either detected or (mis)corrected
    assert OK not in status.tolist()


def test_no_error_is_ok() -> None:
    code = SecDed(32)
    words = torch.tensor(WORDS32)
    out, status = code.decode(words, code.encode(words))
    assert out.tolist() == WORDS32 and set(status.tolist()) == {OK}


def test_parity_matches_popcount() -> None:
    xs = torch.randint(0, 2**62, (200,), generator=torch.Generator().manual_seed(1))
    assert parity(xs).tolist() == [bin(x).count("1") % 2 for x in xs.tolist()]


def test_bad_width() -> None:
    with pytest.raises(ConfigError, match="k: expected"):
        SecDed(0)
