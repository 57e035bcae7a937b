"""SEC-DED error-correcting code: extended Hamming code over ``k`` data bits, vectorised.

For ``k = 32`` this is the (39, 32) code: 6 Hamming check bits + 1 overall parity bit per word.
Codeword layout (positions 0..k+r): position 0 = overall parity; positions ``2**i`` (1, 2, 4,
8, 16, 32) = Hamming check bit ``i``; the remaining positions 3, 5, 6, 7, 9, ... hold data bits
0, 1, 2, ... in increasing order. Check bit ``i`` makes the parity of all positions with bit
``i`` set even; the overall bit makes the parity of the whole codeword even.

Decoding (syndrome ``s`` = recomputed check bits XOR stored check bits, ``p`` = overall parity):

* ``s == 0, p == 0``: no error;
* ``p == 1``: a single error at position ``s`` (``s == 0``: the overall bit) -> corrected
  (data bit flipped back if ``s`` is a data position; check-bit errors leave the data intact);
  a syndrome beyond the last position can only come from >= 3 errors -> detected;
* ``p == 0, s != 0``: a double error -> detected, data returned unchanged.

Three or more errors may be miscorrected (reported "corrected" with wrong data): callers compare
the delivered word with the golden one. Data and check words are unsigned ``int64`` tensors.

>>> code = SecDed(32)
>>> d = torch.tensor([0x3F800000])
>>> c = code.encode(d)
>>> out, st = code.decode(d ^ (1 << 30), c)
>>> hex(out.item()), int(st.item()) == CORRECTED
('0x3f800000', True)
"""

from __future__ import annotations

import torch
from torch import Tensor

from flipguard.errors import ConfigError

__all__ = ["CORRECTED", "DETECTED", "OK", "SecDed", "parity"]

OK, CORRECTED, DETECTED = 0, 1, 2


def parity(x: Tensor) -> Tensor:
    """Parity (0/1, int64) of each non-negative integer of ``x`` (< 2**63).

    >>> parity(torch.tensor([0, 1, 3, 7])).tolist()
    [0, 1, 0, 1]
    """
    x = x.to(torch.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        x = x ^ (x >> shift)
    return x & 1


class SecDed:
    """Extended Hamming SEC-DED code for ``k``-bit data words (``r + 1`` check bits).

    ``check_bits`` = r + 1 (7 for 32-bit words, 6 for 16-bit, 5 for 8-bit).
    ``data_positions[j]`` = codeword position of data bit ``j``.
    """

    def __init__(self, k: int = 32) -> None:
        if not 1 <= int(k) <= 57:
            raise ConfigError(f"k: expected 1..57 data bits per word, got {k}")
        self.k = int(k)
        r = 1
        while (1 << r) < self.k + r + 1:
            r += 1
        self.r = r
        self.n = self.k + r + 1  # codeword length including the overall parity bit
        self.check_bits = r + 1
        pos = [p for p in range(1, self.k + r + 1) if p & (p - 1)]
        self.data_positions = tuple(pos[: self.k])
        self.masks = tuple(sum(1 << j for j, p in enumerate(self.data_positions) if p >> i & 1)
                           for i in range(r))
        table = [0] * (1 << r)  # syndrome -> data-bit mask to flip
        bad = [False] * (1 << r)  # syndrome points past the last position
        for j, p in enumerate(self.data_positions):
            table[p] = 1 << j
        for s in range(self.k + r + 1, 1 << r):
            bad[s] = True
        self._flip = torch.tensor(table, dtype=torch.int64)
        self._bad = torch.tensor(bad, dtype=torch.bool)

    def _syndrome_bits(self, data: Tensor) -> Tensor:
        out = torch.zeros_like(data)
        for i, m in enumerate(self.masks):
            out = out | (parity(data & m) << i)
        return out

    def encode(self, data: Tensor) -> Tensor:
        """Check word of each data word: bits 0..r-1 Hamming checks, bit r overall parity."""
        data = data.to(torch.int64) & ((1 << self.k) - 1)
        h = self._syndrome_bits(data)
        return h | ((parity(data) ^ parity(h)) << self.r)

    def decode(self, data: Tensor, check: Tensor) -> tuple[Tensor, Tensor]:
        """(corrected data, status) with status OK=0, CORRECTED=1, DETECTED=2 (int64)."""
        data = data.to(torch.int64) & ((1 << self.k) - 1)
        check = check.to(torch.int64) & ((1 << self.check_bits) - 1)
        data, check = torch.broadcast_tensors(data, check)
        hmask = (1 << self.r) - 1
        s = self._syndrome_bits(data) ^ (check & hmask)
        p = parity(data) ^ parity(check)
        flip, bad = self._flip.to(data.device)[s], self._bad.to(data.device)[s]
        single = (p == 1) & ~bad
        detected = ((p == 0) & (s != 0)) | ((p == 1) & bad)
        out = torch.where(single, data ^ flip, data)
        status = torch.where(detected, DETECTED, torch.where(single, CORRECTED, OK))
        return out, status.to(torch.int64)

    def __repr__(self) -> str:
        return f"SecDed(n={self.n}, k={self.k})"
