"""Protection mechanisms modelled exactly in the fault path, with their memory cost in bits.

Every mechanism maps (golden stored word, fault bit mask, fault kind) to the word the protected
hardware delivers at use time plus a status. Words here are *unsigned* ``int64`` tensors
holding the format's ``bits`` low bits (``to_unsigned`` / ``to_signed`` convert from/to the
format's signed word dtype). A fault only hits the stored data word; check bits, TMR copies
and range bounds are modelled fault-free (campaign faults only sample data bits).

Order of application at read time (``ReadPath.deliver``):

1. bit restoration: TMR majority vote of the protected bits (two clean copies) and invariant
   forcing of bits that are constant over the group (both can only restore golden bits);
2. word code: SEC-DED ECC (corrects 1 error, detects 2) or parity over a bit group (detects an
   odd number of flips in the group), then the detection policy: ``zero`` (the word reads as
   0) or ``reload`` (golden restored from a clean copy => corrected);
3. range restriction: the value is clamped to the group's fault-free ``[lo, hi]`` (NaN -> 0,
   then clamped); values already inside the range are left bit-exact (so ``-0.0`` stays).

Statuses: ``NO_ERROR`` (the fault left the stored word unchanged), ``CORRECTED`` (delivered ==
golden), ``DETECTED`` (flagged and zeroed by policy ``zero``), ``UNDETECTED`` (anything else).

Every mechanism acts on the *read path* of stored words, so it covers faults in storage only
(the word in memory up to the read port), not in the datapath (multipliers, adders, partial
sums) nor in registers (PE operand registers, pipeline latches) after the read.
``COVERAGE`` declares, per scheme, the fault locations covered and the read-path cost paid at
every load, next to the memory bits of ``Protection.cost_bits``.

>>> p = Protection("tmr", "fc", bits=(30,))
>>> p.cost_bits(n_words=100), p.label
(200, 'tmr[30] fc.weight')
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from flipguard.errors import ConfigError
from flipguard.faults import NumberFormat, get_format
from flipguard.harden.coverage import COVERAGE, LOCATIONS, Coverage
from flipguard.harden.ecc import DETECTED as ECC_DETECTED
from flipguard.harden.ecc import SecDed, parity

__all__ = [
    "CORRECTED", "COVERAGE", "DETECTED", "LOCATIONS", "NO_ERROR", "POLICIES", "SCHEMES",
    "STATUS_NAMES", "UNDETECTED", "Coverage", "Protection", "ReadPath", "constant_bits",
    "ecc_read", "force_bits", "majority", "parse_schemes", "parity_detect", "range_clamp",
    "stored_word", "to_signed", "to_unsigned",
]

SCHEMES = ("tmr", "parity", "ecc", "range", "invariant")
POLICIES = ("zero", "reload")
NO_ERROR, CORRECTED, DETECTED, UNDETECTED = 0, 1, 2, 3
STATUS_NAMES = ("no-error", "corrected", "detected", "undetected")
_CODES: dict[int, SecDed] = {}



def parse_schemes(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"tmr,ecc"`` -> ("tmr", "ecc"); unknown names are a one-line error."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    parts = [p for p in parts if p]
    bad = [p for p in parts if p not in SCHEMES]
    if bad or not parts:
        raise ConfigError(f"schemes: expected a comma list of {','.join(SCHEMES)}, "
                          f"got {bad[0] if bad else text!r}")
    return tuple(dict.fromkeys(parts))


def _code(bits: int) -> SecDed:
    if bits not in _CODES:
        _CODES[bits] = SecDed(bits)
    return _CODES[bits]


def to_unsigned(words: Tensor, bits: int) -> Tensor:
    """Signed format words -> unsigned int64 holding the low ``bits`` bits."""
    return words.to(torch.int64) & ((1 << bits) - 1)


def to_signed(words: Tensor, dtype: torch.dtype, bits: int) -> Tensor:
    """Unsigned int64 words -> the format's signed word dtype (two's complement)."""
    w = words & ((1 << bits) - 1)
    return torch.where(w >= (1 << (bits - 1)), w - (1 << bits), w).to(dtype)


def stored_word(golden: Tensor, masks: Tensor | int, kind: str) -> Tensor:
    """The faulty stored word: ``kind`` "flip" | "stuck-at-0" | "stuck-at-1" on ``masks``."""
    if kind == "flip":
        return golden ^ masks
    if kind == "stuck-at-0":
        return golden & ~torch.as_tensor(masks, dtype=torch.int64)
    if kind == "stuck-at-1":
        return golden | masks
    raise ConfigError(f"kind: expected flip, stuck-at-0 or stuck-at-1, got {kind!r}")


def majority(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Bitwise 2-of-3 majority vote (the TMR voter)."""
    return (a & b) | (a & c) | (b & c)


def force_bits(words: Tensor, mask: Tensor | int, values: Tensor | int) -> Tensor:
    """Invariant forcing: bits of ``mask`` read as the bits of ``values``."""
    m = torch.as_tensor(mask, dtype=torch.int64)
    return (words & ~m) | (torch.as_tensor(values, dtype=torch.int64) & m)


def parity_detect(golden: Tensor, word: Tensor, group: Tensor | int) -> Tensor:
    """Parity check of ``group`` bits: True where the stored parity (of the golden group)
    disagrees with the read word, i.e. an odd number of group bits flipped."""
    return (parity(word & group) ^ parity(golden & group)) == 1


def ecc_read(golden: Tensor, word: Tensor, bits: int = 32) -> tuple[Tensor, Tensor]:
    """SEC-DED read of ``word`` whose (clean) check bits were computed from ``golden``:
    (decoded word, detected bool)."""
    code = _code(bits)
    out, st = code.decode(word, code.encode(golden))
    return out, st == ECC_DETECTED


def range_clamp(words: Tensor, lo: Tensor | float, hi: Tensor | float,
                fmt: NumberFormat) -> Tensor:
    """Clamp the values of unsigned ``words`` to ``[lo, hi]``: NaN -> 0 then clamped; values
    inside the range keep their exact word. ``torch.clamp`` alone would propagate NaN."""
    vals = fmt.decode(to_signed(words, fmt.word_dtype, fmt.bits))
    lo_t = torch.as_tensor(lo, dtype=vals.dtype, device=vals.device)
    hi_t = torch.as_tensor(hi, dtype=vals.dtype, device=vals.device)
    nan = torch.isnan(vals)
    out_of = nan | (vals < lo_t) | (vals > hi_t)
    fixed = torch.minimum(torch.maximum(torch.where(nan, torch.zeros_like(vals), vals), lo_t),
                          hi_t)
    return torch.where(out_of, to_unsigned(fmt.encode(fixed), fmt.bits), words)


def constant_bits(words: Tensor, bits: int = 32) -> tuple[int, int]:
    """(mask, values) of the bits that have the same value in every unsigned word.

    >>> constant_bits(torch.tensor([0b1010, 0b1110]), 4)
    (11, 10)
    """
    full = (1 << bits) - 1
    if words.numel() == 0:
        return 0, 0
    w = words.reshape(-1).to(torch.int64) & full
    all_and, any_or = full, 0
    for i in range(bits):  # per-bit reduction (torch has no bitwise and-reduce)
        col = (w >> i) & 1
        if int(col.min()) == 0:
            all_and &= ~(1 << i)
        if int(col.max()) == 1:
            any_or |= 1 << i
    mask = all_and | (~any_or & full)
    return mask, all_and


@dataclass(frozen=True)
class Protection:
    """One protection of one group: the ``target`` tensor of ``layer`` (``kernel`` None) or one
    kernel of it.

    ``scheme``: "tmr" (``bits`` triplicated), "parity" (one parity bit over the ``bits``
    group), "ecc" (SEC-DED per word), "range" (clamp to ``[lo, hi]``), "invariant" (``bits``
    forced to their constant values, unsigned mask ``values``). ``policy`` ("zero" | "reload")
    says what a detected word (parity, ECC double error) reads as.
    """

    scheme: str
    layer: str
    target: str = "weight"
    kernel: int | None = None
    bits: tuple[int, ...] = ()
    values: int = 0
    policy: str = "zero"
    lo: float | None = None
    hi: float | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme: expected one of {', '.join(SCHEMES)}, "
                              f"got {self.scheme!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy: expected zero or reload, got {self.policy!r}")
        bits = tuple(sorted({int(b) for b in self.bits}))
        if any(b < 0 or b > 63 for b in bits):
            raise ConfigError(f"bits: expected bit positions 0..63, got {self.bits!r}")
        if self.scheme in ("tmr", "parity", "invariant") and not bits:
            raise ConfigError(f"bits: {self.scheme} protection of {self.layer!r} needs bits")
        if self.scheme == "range" and (self.lo is None or self.hi is None or self.lo > self.hi):
            raise ConfigError(f"lo/hi: range protection of {self.layer!r} needs lo <= hi")
        object.__setattr__(self, "bits", bits)
        if self.kernel is not None:
            object.__setattr__(self, "kernel", int(self.kernel))

    @property
    def coverage(self) -> Coverage:
        """Fault locations covered and read-path cost of this scheme (``COVERAGE``)."""
        return COVERAGE[self.scheme]

    @property
    def mask(self) -> int:
        """Unsigned mask of ``bits``."""
        return sum(1 << b for b in self.bits)

    @property
    def group(self) -> str:
        """Group name, e.g. "encoder.0.weight" or "encoder.0.weight/k3"."""
        k = "" if self.kernel is None else f"/k{self.kernel}"
        return f"{self.layer}.{self.target}{k}"

    @property
    def label(self) -> str:
        """Short text, e.g. "tmr[30] encoder.0.weight" or "ecc(zero) fc.weight/k1"."""
        if self.scheme in ("tmr", "parity", "invariant"):
            b = ",".join(str(x) for x in sorted(self.bits, reverse=True))
            head = f"{self.scheme}[{b}]"
        else:
            head = self.scheme
        if self.scheme in ("parity", "ecc"):
            head += f"({self.policy})"
        return f"{head} {self.group}"

    def cost_bits(self, n_words: int, word_bits: int = 32) -> int:
        """Extra storage in bits for a group of ``n_words`` words of ``word_bits`` bits:
        tmr 2/bit/word, parity 1/word, ecc r+1/word (7 for 32 bits), range 2 words per
        group; invariant 0 per layer (a constant of the layer's read path), 2 words (mask and
        values) per kernel."""
        if self.scheme == "tmr":
            return 2 * len(self.bits) * int(n_words)
        if self.scheme == "parity":
            return int(n_words)
        if self.scheme == "ecc":
            return _code(word_bits).check_bits * int(n_words)
        if self.scheme == "range" or self.kernel is not None:
            return 2 * int(word_bits)
        return 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (inverse: ``Protection.from_dict``)."""
        d = asdict(self)
        d["bits"] = list(self.bits)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Protection:
        """Rebuild from ``to_dict`` output; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"protection: unknown field {extra[0]!r}")
        kw = dict(d)
        kw["bits"] = tuple(kw.get("bits") or ())
        return cls(**kw)


@dataclass
class ReadPath:
    """Per-word protection parameters of one tensor (all 1-D, one entry per flat element).

    Build with ``ReadPath.build``; ``path.select(idx)`` keeps some elements;
    ``path.deliver(golden, masks, kind)`` models a read.
    """

    fmt: NumberFormat
    tmr: Tensor
    force_mask: Tensor
    force_vals: Tensor
    parity: Tensor
    ecc: Tensor
    zero: Tensor
    lo: Tensor
    hi: Tensor
    ranged: Tensor

    @classmethod
    def build(cls, protections: Iterable[Protection], numel: int,
              kernel_of: Tensor | None = None, fmt: NumberFormat | str = "fp32") -> ReadPath:
        """Combine ``protections`` (all of one layer/target) over ``numel`` words; ``kernel_of``
        gives each element's kernel (needed when a protection names a kernel)."""
        fmt = get_format(fmt)
        protections = list(protections)
        z = torch.zeros(numel, dtype=torch.int64)
        path = cls(fmt, z.clone(), z.clone(), z.clone(), z.clone(), z.bool(), z.bool(),
                   torch.full((numel,), -torch.inf), torch.full((numel,), torch.inf), z.bool())
        codes = z.clone()
        for p in protections:
            if p.kernel is None:
                sel = torch.ones(numel, dtype=torch.bool)
            elif kernel_of is None:
                raise ConfigError(f"kernel: {p.label} needs the layer's kernel ids")
            else:
                sel = kernel_of.reshape(-1) == p.kernel
            if p.bits and max(p.bits) >= fmt.bits:
                raise ConfigError(f"bits: {p.label} names bits beyond {fmt.name}'s {fmt.bits}")
            m = torch.tensor(p.mask, dtype=torch.int64)
            if p.scheme == "tmr":
                path.tmr = torch.where(sel, path.tmr | m, path.tmr)
            elif p.scheme == "invariant":
                clash = sel & (((path.force_vals ^ p.values) & path.force_mask & m) != 0)
                if bool(clash.any()):
                    raise ConfigError(f"protections: {p.label} contradicts another invariant")
                path.force_mask = torch.where(sel, path.force_mask | m, path.force_mask)
                path.force_vals = torch.where(sel, path.force_vals | (p.values & p.mask),
                                              path.force_vals)
            elif p.scheme in ("parity", "ecc"):
                codes = codes + sel.to(torch.int64)
                if p.scheme == "parity":
                    path.parity = torch.where(sel, m, path.parity)
                else:
                    path.ecc = path.ecc | sel
                path.zero = torch.where(sel, torch.tensor(p.policy == "zero"), path.zero)
            else:
                path.lo = torch.where(sel, torch.clamp_min(path.lo, float(p.lo)), path.lo)
                path.hi = torch.where(sel, torch.clamp_max(path.hi, float(p.hi)), path.hi)
                path.ranged = path.ranged | sel
        if bool((codes > 1).any()):
            raise ConfigError(f"protections: more than one word code (parity/ecc) on a word of "
                              f"{protections[0].layer!r}; keep one per group")
        return path

    def select(self, index: Tensor | Sequence[int]) -> ReadPath:
        """The read path of the elements at flat ``index``."""
        idx = torch.as_tensor(index, dtype=torch.int64)
        return ReadPath(self.fmt, *(getattr(self, f)[idx] for f in (
            "tmr", "force_mask", "force_vals", "parity", "ecc", "zero", "lo", "hi", "ranged")))

    def deliver(self, golden: Tensor, masks: Tensor | int, kind: str,
                fmt: NumberFormat | None = None) -> tuple[Tensor, Tensor]:
        """(delivered unsigned words, status) for a read of words whose golden (unsigned)
        value is ``golden`` after a fault ``kind`` on ``masks``; ``fmt`` overrides the path's
        format (INT8: the format bound to these elements, for range clamping).

        >>> path = ReadPath.build([Protection("ecc", "fc")], 1)
        >>> w, st = path.deliver(torch.tensor([0x3F800000]), torch.tensor([1 << 30]), "flip")
        >>> hex(w.item()), STATUS_NAMES[st.item()]
        ('0x3f800000', 'corrected')
        """
        fmt = self.fmt if fmt is None else fmt
        bits = fmt.bits
        full = (1 << bits) - 1
        g = golden.to(torch.int64) & full
        m = torch.as_tensor(masks, dtype=torch.int64) & full
        stored = stored_word(g, m, kind) & full
        # 1. bit restoration: TMR vote against two clean copies, invariant forcing
        w = (majority(stored, g, g) & self.tmr) | (stored & ~self.tmr)
        w = force_bits(w, self.force_mask, self.force_vals)
        # 2. word code and detection policy
        det = (self.parity != 0) & parity_detect(g, w, self.parity)
        if bool(self.ecc.any()):
            dec, ecc_det = ecc_read(g, w, bits)
            w = torch.where(self.ecc, dec, w)
            det = det | (self.ecc & ecc_det)
        w = torch.where(det, torch.where(self.zero, torch.zeros_like(w), g), w)
        # 3. range restriction (value level)
        if bool(self.ranged.any()):
            w = torch.where(self.ranged, range_clamp(w, self.lo, self.hi, fmt), w)
        status = torch.full_like(w, UNDETECTED)
        status = torch.where(w == g, CORRECTED, status)
        status = torch.where(det & self.zero, DETECTED, status)
        status = torch.where((stored == g) & (w == g), NO_ERROR, status)
        return w, status
