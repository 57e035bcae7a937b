"""Fault models: what happens to a stored word (bit flips, multi-bit upsets, stuck-at bits).

>>> f = Fault(target="weight", layer="encoder.0", index=3, bits=(31,))
>>> apply_fault(torch.tensor(2.0), f, get_format("fp32")).item()
-2.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flipguard.errors import ConfigError
from flipguard.faults.formats import (
    NumberFormat,
    bits_mask,
    clear_bits,
    flip_bits,
    get_format,
    set_bits,
)
from flipguard.faults.sites import TARGETS, FaultSite

__all__ = [
    "KINDS",
    "Fault",
    "mbu",
    "apply_fault",
    "apply_bits",
    "is_noop",
    "noop_mask",
    "fault_to_dict",
    "fault_from_dict",
]

KINDS = ("flip", "stuck-at-0", "stuck-at-1")


def _parse_bits(bits: object) -> tuple[int, ...]:
    if isinstance(bits, str):
        parts = [p for p in bits.strip("[]() ").replace(" ", "").split(",") if p]
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"bits: expected comma-separated integers, got {bits!r}") from None
    elif isinstance(bits, (int, np.integer)):
        vals = [int(bits)]
    else:
        vals = [int(b) for b in bits]  # type: ignore[union-attr]
    return tuple(vals)


@dataclass(frozen=True, order=True)
class Fault:
    """One fault: ``bits`` of the word at flat ``index`` of ``target`` of module ``layer``.

    ``kind``: "flip" (one bit = SEU, several = MBU), "stuck-at-0", "stuck-at-1". ``bits`` is
    stored sorted ascending; for activations ``index`` is within ONE sample's output.

    >>> Fault("weight", "fc", 7, (3, 2)).bits
    (2, 3)
    """

    target: str
    layer: str
    index: int
    bits: tuple[int, ...]
    kind: str = "flip"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"target: expected one of {', '.join(TARGETS)}, "
                              f"got {self.target!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        bits = _parse_bits(self.bits)
        if not bits or len(set(bits)) != len(bits) or min(bits) < 0:
            raise ConfigError(f"bits: expected distinct non-negative bit positions, "
                              f"got {self.bits!r}")
        if int(self.index) < 0:
            raise ConfigError(f"index: expected a non-negative flat index, got {self.index}")
        object.__setattr__(self, "bits", tuple(sorted(bits)))
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "layer", str(self.layer))

    @property
    def site(self) -> FaultSite:
        """The site of the lowest faulty bit."""
        return FaultSite(self.target, self.layer, self.index, self.bits[0])

    @property
    def mask(self) -> int:
        """Unsigned bit mask of ``bits``."""
        return sum(1 << b for b in self.bits)

    @classmethod
    def from_site(cls, site: FaultSite, kind: str = "flip",
                  bits: Sequence[int] | None = None) -> Fault:
        """Fault at ``site`` (``bits`` overrides the site's single bit, e.g. from ``mbu``)."""
        return cls(site.target, site.layer, site.index,
                   tuple(bits) if bits is not None else (site.bit,), kind)


def mbu(site: FaultSite, k: int, mode: str = "adjacent",
        rng: np.random.Generator | None = None, word_bits: int = 32) -> tuple[int, ...]:
    """Bit tuple of a ``k``-bit multi-bit upset around ``site.bit`` in a ``word_bits`` word.

    "adjacent": ``k`` consecutive bits starting at ``site.bit``, shifted down to fit the word;
    "random": ``site.bit`` plus ``k - 1`` distinct other bits drawn uniformly with ``rng``.

    >>> mbu(FaultSite("weight", "fc", 0, 30), 3)
    (29, 30, 31)
    """
    if not 1 <= k <= word_bits:
        raise ConfigError(f"k: expected 1..{word_bits} bits per upset, got {k}")
    if not 0 <= site.bit < word_bits:
        raise ConfigError(f"bit: expected 0..{word_bits - 1}, got {site.bit}")
    if mode == "adjacent":
        start = min(site.bit, word_bits - k)
        return tuple(range(start, start + k))
    if mode == "random":
        if rng is None:
            raise ConfigError("rng: mode 'random' needs a numpy Generator")
        others = np.array([b for b in range(word_bits) if b != site.bit])
        extra = rng.choice(others, size=k - 1, replace=False) if k > 1 else []
        return tuple(sorted([site.bit, *(int(b) for b in extra)]))
    raise ConfigError(f"mode: expected 'adjacent' or 'random', got {mode!r}")


def _faulty_words(words: Tensor, masks: int | Tensor, kind: str) -> Tensor:
    if kind == "flip":
        return flip_bits(words, masks)
    if kind == "stuck-at-0":
        return clear_bits(words, masks)
    if kind == "stuck-at-1":
        return set_bits(words, masks)
    raise ConfigError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _decode_like(words: Tensor, values: Tensor, fmt: NumberFormat) -> Tensor:
    native = getattr(fmt, "dtype", None)
    if native is not None and values.dtype == native:  # exact, no NaN re-conversion
        return words.view(native)
    return fmt.decode(words).to(values.dtype)


def apply_bits(values: Tensor, masks: int | Tensor, kind: str,
               fmt: NumberFormat | str = "fp32") -> Tensor:
    """Vectorised fault: encode ``values``, apply ``kind`` with ``masks`` (int or integer
    tensor broadcastable to ``values``; unsigned bit masks), decode back.

    Same dtype/device as ``values``; INT8 formats must be bound to these elements
    (``fmt.bind(w, axis).select(idx)``).

    >>> apply_bits(torch.tensor([1.0, 2.0]), torch.tensor([1 << 31, 0]), "flip").tolist()
    [-1.0, 2.0]
    """
    fmt = get_format(fmt)
    words = fmt.encode(values)
    return _decode_like(_faulty_words(words, masks, kind), values, fmt)


def _check_bits(fault: Fault, fmt: NumberFormat) -> int:
    if fault.bits[-1] >= fmt.bits:
        raise ConfigError(f"bits: expected 0..{fmt.bits - 1} for {fmt.name}, "
                          f"got {fault.bits[-1]}")
    return bits_mask(fault.bits, fmt.bits)


def apply_fault(values: Tensor, fault: Fault, fmt: NumberFormat | str = "fp32") -> Tensor:
    """Pure: faulty copy of the stored ``values`` of the element(s) addressed by ``fault``.

    >>> f = Fault("weight", "fc", 0, (0,), kind="stuck-at-1")
    >>> apply_fault(torch.tensor(0.0), f, "fp32").view(torch.int32).item()
    1
    """
    fmt = get_format(fmt)
    return apply_bits(values, _check_bits(fault, fmt), fault.kind, fmt)


def noop_mask(values: Tensor, masks: int | Tensor, kind: str,
              fmt: NumberFormat | str = "fp32") -> Tensor:
    """Bool tensor: where the fault leaves the stored word unchanged (stuck-at = stored bit)."""
    fmt = get_format(fmt)
    words = fmt.encode(values)
    return torch.eq(_faulty_words(words, masks, kind), words)


def is_noop(values: Tensor, fault: Fault, fmt: NumberFormat | str = "fp32") -> bool:
    """True when ``fault`` changes no stored bit of ``values`` (a stuck-at equal to the stored
    bit); flips are never no-ops. Callers record such faults instead of running them.

    >>> is_noop(torch.tensor(1.0), Fault("weight", "fc", 0, (31,), "stuck-at-0"))
    True
    """
    fmt = get_format(fmt)
    return bool(noop_mask(values, _check_bits(fault, fmt), fault.kind, fmt).all())


def fault_to_dict(fault: Fault, bits_as: str = "list") -> dict[str, Any]:
    """JSON/SQLite-friendly dict; ``bits_as="str"`` stores bits as "29,30".

    >>> fault_to_dict(Fault("bias", "fc", 1, (2, 3)), bits_as="str")["bits"]
    '2,3'
    """
    bits: Any = list(fault.bits)
    if bits_as == "str":
        bits = ",".join(str(b) for b in fault.bits)
    elif bits_as != "list":
        raise ConfigError(f"bits_as: expected 'list' or 'str', got {bits_as!r}")
    return {"target": fault.target, "layer": fault.layer, "index": fault.index,
            "bits": bits, "kind": fault.kind}


def fault_from_dict(d: Mapping[str, Any]) -> Fault:
    """Inverse of ``fault_to_dict`` (bits as list, int, "1,2" or "[1, 2]"; kind defaults "flip")."""
    missing = [k for k in ("target", "layer", "index", "bits") if k not in d]
    if missing:
        raise ConfigError(f"fault: missing field {missing[0]!r}")
    return Fault(str(d["target"]), str(d["layer"]), int(d["index"]),
                 _parse_bits(d["bits"]), str(d.get("kind") or "flip"))
