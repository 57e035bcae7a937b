"""Fault sites (where): coordinates, kernels, and the per-layer site space of a model.

A site is ``(target, layer, index, bit)``; ``index`` is the flat index in the stored tensor
layout (for activations: within ONE sample's output of module ``layer``). The site space is
enumerated per stratum (layer, bit, kernel) without being materialised.

>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
>>> space, rng = SiteSpace(net), np.random.default_rng(0)
>>> [(ls.name, ls.population) for ls in space.layers], len(space.sample(rng, 5, "0", kernel=1))
([('0', 576), ('2', 512)], 5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.faults.formats import NumberFormat, get_format
from flipguard.layers import eval_mode, forward_hooks

__all__ = ["TARGETS", "DEFAULT_LAYER_TYPES", "FaultSite", "LayerSpace", "SiteSpace", "Stratum",
           "coords_of", "index_of", "kernel_of", "kernel_ids"]

TARGETS = ("weight", "bias", "activation")
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONVT, nn.Linear)
Bits = Sequence[int] | str | None  # bit positions, a field name ("exponent") or all bits


@dataclass(frozen=True, order=True)
class FaultSite:
    """One bit of one stored element: ``FaultSite("weight", "encoder.0", 123, 30)``."""

    target: str
    layer: str
    index: int
    bit: int


def coords_of(index: int | np.ndarray, shape: Sequence[int]) -> tuple:
    """Coordinates of flat ``index`` (int or int array) in a C-contiguous ``shape``.

    >>> coords_of(5, (2, 3))
    (1, 2)
    """
    shape, arr = tuple(int(s) for s in shape), np.asarray(index, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= (n := math.prod(shape))):
        raise ConfigError(f"index: expected 0..{n - 1} for shape {shape}, got {index}")
    out = np.unravel_index(arr, shape) if shape else ()
    return tuple(int(c) for c in out) if arr.ndim == 0 else tuple(out)


def index_of(coords: Sequence[int | np.ndarray], shape: Sequence[int]) -> int | np.ndarray:
    """Flat index of ``coords`` in a C-contiguous ``shape`` (inverse of ``coords_of``).

    >>> index_of((1, 2), (2, 3))
    5
    """
    shape = tuple(int(s) for s in shape)
    if len(coords) != len(shape):
        raise ConfigError(f"coords: expected {len(shape)} coordinates for shape {shape}")
    try:
        out = np.ravel_multi_index(tuple(np.asarray(c, dtype=np.int64) for c in coords), shape)
    except ValueError:
        raise ConfigError(f"coords: {coords} out of range for shape {shape}") from None
    return int(out) if np.ndim(out) == 0 else out


def _layer_space(name: str, module: nn.Module, target: str, shape: Sequence[int] | None,
                 bits: int) -> LayerSpace:
    if target not in TARGETS:
        raise ConfigError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    if target != "activation":
        t = getattr(module, target, None)
        if not isinstance(t, Tensor):
            raise ConfigError(f"target: {type(module).__name__} has no {target} tensor")
        shape = tuple(t.shape)
    elif shape is None:
        raise ConfigError("shape: activation kernels need the per-sample output shape")
    shape = tuple(int(s) for s in shape)
    axis, groups, n = 0, 1, (shape[0] if shape else 1)
    if target == "weight" and isinstance(module, _CONVT) and len(shape) >= 2:
        axis, groups = 1, int(getattr(module, "groups", 1))
        n = groups * shape[1]
    elif target == "bias" or len(shape) <= 1:
        n = max(math.prod(shape), 1)
    numel = math.prod(shape)
    return LayerSpace(name, type(module).__name__, target, shape, numel, n, axis, bits,
                      numel * bits, groups)


def kernel_of(module: nn.Module, target: str, index: int | np.ndarray,
              shape: Sequence[int] | None = None) -> int | np.ndarray:
    """Kernel (output-channel filter) of the element at flat ``index`` (int or int array).

    Conv/Linear weight: axis 0; ConvTranspose weight (in, out/groups, ...): the output channel
    ``group * (out/groups) + axis-1 index``; bias: its index; activation (``shape`` = one
    sample's output shape, e.g. (C, H, W)): the channel.

    >>> kernel_of(torch.nn.ConvTranspose2d(2, 3, 1), "weight", 4)
    1
    """
    ls = _layer_space("", module, target, shape, 1)
    coords_of(index, ls.shape)  # range check
    return ls.kernel_of(index)


def kernel_ids(module: nn.Module, target: str, shape: Sequence[int] | None = None) -> Tensor:
    """int64 tensor broadcastable to the target tensor giving each element's kernel, e.g. for
    ``get_format("int8-channel").bind(w, kernel_ids=kernel_ids(conv_t, "weight"))``."""
    return _layer_space("", module, target, shape, 1).kernel_ids()


@dataclass(frozen=True)
class LayerSpace:
    """Site space of one target tensor of one module (no sites materialised).

    ``population = numel * bits``; kernels are output-channel filters (see ``kernel_of``);
    ``groups`` is only used for ConvTranspose weights (``kernel_axis == 1``).
    """

    name: str
    module_type: str
    target: str
    shape: tuple[int, ...]
    numel: int
    n_kernels: int
    kernel_axis: int
    bits: int
    population: int
    groups: int = 1

    @property
    def kernel_numel(self) -> int:
        """Elements per kernel."""
        return self.numel // self.n_kernels

    def kernel_of(self, index: int | np.ndarray) -> int | np.ndarray:
        """Kernel of flat ``index`` (int or int array)."""
        idx, shape = np.asarray(index, dtype=np.int64), self.shape
        if self.kernel_axis == 1:  # (in, out/groups, *k): kernel = group * (out/groups) + c
            inner = math.prod(shape[2:])
            i, c = idx // (shape[1] * inner), (idx // inner) % shape[1]
            out = (i // (shape[0] // self.groups)) * shape[1] + c
        else:
            out = idx // self.kernel_numel
        return int(out) if np.ndim(out) == 0 else out

    def kernel_ids(self) -> Tensor:
        """int64 kernel id of every element, as a tensor broadcastable to ``shape``."""
        shape, n = self.shape, self.n_kernels
        if self.kernel_axis == 1:
            ipg, opg = shape[0] // self.groups, shape[1]
            ids = (torch.arange(shape[0])[:, None] // ipg) * opg + torch.arange(opg)[None, :]
            return ids.reshape(shape[:2] + (1,) * (len(shape) - 2))
        if len(shape) <= 1 or self.target == "bias":
            return torch.arange(n).reshape(shape)
        return torch.arange(n).reshape((n,) + (1,) * (len(shape) - 1))

    def kernel_elements(self, kernel: int, j: int | np.ndarray | None = None) -> np.ndarray:
        """Flat indices of the ``j``-th elements (default: all, in flat order) of ``kernel``."""
        if not 0 <= int(kernel) < self.n_kernels:
            raise ConfigError(f"kernel: expected 0..{self.n_kernels - 1} for layer "
                              f"{self.name!r}, got {kernel}")
        kn = self.kernel_numel
        j = np.arange(kn, dtype=np.int64) if j is None else np.asarray(j, dtype=np.int64)
        if self.kernel_axis != 1:
            return int(kernel) * kn + j
        s = math.prod(self.shape[2:])
        opg, ipg = self.shape[1], self.shape[0] // self.groups
        g, c = divmod(int(kernel), opg)
        return ((g * ipg + j // s) * opg + c) * s + j % s


@dataclass(frozen=True)
class Stratum:
    """A stratum of a ``SiteSpace``; ``space.sample(rng, n, **stratum.params)`` draws in it."""

    target: str
    layer: str
    bit: int | None = None
    kernel: int | None = None
    bits: tuple[int, ...] | None = None
    population: int = 0

    @property
    def params(self) -> dict:
        """Keyword arguments for ``SiteSpace.population/decode/sample``."""
        return {"layer": self.layer, "target": self.target, "bit": self.bit,
                "kernel": self.kernel, "bits": self.bits}

    @property
    def key(self) -> str:
        """Stable text key, e.g. "weight:encoder.0:bit=30:kernel=2"."""
        bits = None if self.bits is None else ",".join(map(str, self.bits))
        opt = (("bit", self.bit), ("bits", bits), ("kernel", self.kernel))
        return ":".join([self.target, self.layer, *(f"{k}={v}" for k, v in opt if v is not None)])


class SiteSpace:
    """All fault sites of a model's target tensors, in module-definition order.

    ``SiteSpace(model, targets=("weight",), layer_types=DEFAULT_LAYER_TYPES, layers=None,
    fmt="fp32", example_input=None)``; activation targets need ``example_input`` (one sample
    batch) to learn output shapes. A stratum is a layer, optionally restricted to one ``bit``,
    a ``bits`` subset (ints or a field name such as "exponent") and/or one ``kernel``; its
    sites are numbered ``0..N-1`` index-major: ``k -> (element k // nb, bits[k % nb])``.

    >>> space = SiteSpace(torch.nn.Linear(3, 2), fmt="fp16")
    >>> space.population("", bits="exponent"), space.decode("", 7)
    (30, (0, 7))
    """

    def __init__(self, model: nn.Module, targets: Iterable[str] = ("weight",),
                 layer_types: Iterable[type[nn.Module]] = DEFAULT_LAYER_TYPES,
                 layers: Iterable[str] | None = None, fmt: str | NumberFormat = "fp32",
                 example_input: Tensor | None = None) -> None:
        self.fmt = get_format(fmt)
        self.targets = tuple(targets)
        for t in set(self.targets) - set(TARGETS):
            raise ConfigError(f"targets: expected items of {', '.join(TARGETS)}, got {t!r}")
        types = tuple(layer_types)
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
        if layers is not None:
            wanted, valid = set(layers), [n for n, _ in found]
            for bad in sorted(wanted - set(valid)):
                raise ConfigError(f"layers: unknown layer {bad!r}; valid: {', '.join(valid)}")
            found = [(n, m) for n, m in found if n in wanted]
        self.modules: dict[str, nn.Module] = dict(found)
        act_shapes: dict[str, tuple[int, ...]] = {}
        if "activation" in self.targets:
            if example_input is None:
                raise ConfigError("example_input: required for activation targets")
            act_shapes = _output_shapes(model, self.modules, example_input)
        self.layers: list[LayerSpace] = [
            _layer_space(name, module, t, act_shapes.get(name), self.fmt.bits)
            for name, module in found for t in self.targets
            if t == "activation" or isinstance(getattr(module, t, None), Tensor)]

    def __iter__(self) -> Iterator[LayerSpace]:
        return iter(self.layers)

    @property
    def names(self) -> list[str]:
        """Distinct layer names in module-definition order."""
        return list(dict.fromkeys(ls.name for ls in self.layers))

    def layer(self, name: str, target: str | None = None) -> LayerSpace:
        """The ``LayerSpace`` of ``name`` (``target`` None: the first of ``self.targets``)."""
        matches = [ls for ls in self.layers if ls.name == name]
        if not matches:
            raise ConfigError(f"layer: unknown layer {name!r}; valid: {', '.join(self.names)}")
        for ls in matches:
            if target in (None, ls.target):
                return ls
        have = ", ".join(ls.target for ls in matches)
        raise ConfigError(f"target: layer {name!r} has no {target!r} sites; has: {have}")

    def bound_format(self, layer: str, target: str | None = None,
                     tensor: Tensor | None = None) -> NumberFormat:
        """``self.fmt`` bound to the layer's tensor (INT8 learns its per-kernel scales; float
        formats return themselves). ``tensor`` defaults to the module's weight/bias."""
        ls = self.layer(layer, target)
        if tensor is None and ls.target == "activation":
            raise ConfigError("tensor: activation formats need the activation tensor")
        t = getattr(self.modules[ls.name], ls.target) if tensor is None else tensor
        return self.fmt.bind(t, axis=ls.kernel_axis, kernel_ids=ls.kernel_ids().to(t.device))

    def resolve_bits(self, bit: int | None = None, bits: Bits = None) -> np.ndarray:
        """Sorted bit positions of a stratum's ``bit`` / ``bits`` selection (validated)."""
        nb = self.fmt.bits
        if bits is None:
            chosen = tuple(range(nb))
        elif isinstance(bits, str):
            chosen = self.fmt.bits_of_field(bits)
        else:
            chosen = tuple(sorted({int(b) for b in bits}))
        bad = [b for b in chosen + (() if bit is None else (int(bit),)) if not 0 <= b < nb]
        if bad or not chosen:
            raise ConfigError(f"bit: expected bit positions 0..{nb - 1} for {self.fmt.name}, "
                              f"got {bad[0] if bad else '()'}")
        if bit is not None and int(bit) not in chosen:
            raise ConfigError(f"bit: {bit} is not in the selected bits {chosen}")
        chosen = chosen if bit is None else (int(bit),)
        return np.asarray(chosen, dtype=np.int64)

    _resolve_bits = resolve_bits  # backward-compatible alias

    def _stratum(self, layer, bit, kernel, bits, target) -> tuple[LayerSpace, np.ndarray, int]:
        ls, bitset = self.layer(layer, target), self.resolve_bits(bit, bits)
        if kernel is not None:
            ls.kernel_elements(kernel, np.zeros(0))  # range check
        return ls, bitset, (ls.numel if kernel is None else ls.kernel_numel) * len(bitset)

    def population(self, layer: str | None = None, bit: int | None = None,
                   kernel: int | None = None, bits: Bits = None, target: str | None = None) -> int:
        """Number of sites N of a stratum (``layer=None``: summed over all layer spaces of
        ``target``, or of every target when it is None)."""
        if layer is None:
            return sum(self._stratum(ls.name, bit, kernel, bits, ls.target)[2]
                       for ls in self.layers if target in (None, ls.target))
        return self._stratum(layer, bit, kernel, bits, target)[2]

    def decode(self, layer: str, k: int | np.ndarray, bit: int | None = None,
               kernel: int | None = None, bits: Bits = None, target: str | None = None) -> tuple:
        """Stratum-local ``k`` in [0, N) (int or int array) -> ``(index, bit)``."""
        ls, bitset, n = self._stratum(layer, bit, kernel, bits, target)
        arr = np.asarray(k, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ConfigError(f"k: expected 0..{n - 1} in this stratum of {layer!r}, got {k}")
        elem, b = np.divmod(arr, len(bitset))
        index = elem if kernel is None else ls.kernel_elements(kernel, elem)
        return (int(index), int(bitset[b])) if arr.ndim == 0 else (index, bitset[b])

    def sites(self, layer: str, k: int | np.ndarray, bit: int | None = None,
              kernel: int | None = None, bits: Bits = None,
              target: str | None = None) -> list[FaultSite]:
        """``FaultSite`` list of stratum-local ints ``k``."""
        ls = self.layer(layer, target)
        idx, bs = self.decode(layer, np.atleast_1d(k), bit, kernel, bits, ls.target)
        return [FaultSite(ls.target, ls.name, int(i), int(b))
                for i, b in zip(idx.tolist(), bs.tolist(), strict=True)]

    def sample_indices(self, rng: np.random.Generator, n: int, layer: str,
                       bit: int | None = None, kernel: int | None = None, bits: Bits = None,
                       target: str | None = None, exclude: Iterable[int] | None = None,
                       ) -> np.ndarray:
        """``n`` distinct stratum-local ints drawn uniformly, skipping ``exclude`` (ints drawn
        before: lets callers top up a stratum without replacement)."""
        total = self.population(layer, bit, kernel, bits, target)
        excl = np.unique(np.fromiter(() if exclude is None else exclude, np.int64))
        excl = excl[(excl >= 0) & (excl < total)]
        left = total - len(excl)
        if not 0 <= n <= left:
            raise ConfigError(f"n: expected 0..{left} sites left in this stratum of "
                              f"{layer!r}, got {n}")
        r = rng.choice(left, size=n, replace=False).astype(np.int64)
        if len(excl):  # r-th non-excluded value: shift by excluded values at or below it
            r = r + np.searchsorted(excl - np.arange(len(excl)), r, side="right")
        return r

    def sample(self, rng: np.random.Generator, n: int, layer: str, bit: int | None = None,
               kernel: int | None = None, bits: Bits = None, target: str | None = None,
               exclude: Iterable[int] | None = None) -> list[FaultSite]:
        """``n`` distinct sites drawn uniformly from a stratum (seeded by ``rng``)."""
        k = self.sample_indices(rng, n, layer, bit, kernel, bits, target, exclude)
        return self.sites(layer, k, bit, kernel, bits, target)

    def strata(self, by: Iterable[str] = ("layer",), bits: Bits = None,
               target: str | None = None) -> list[Stratum]:
        """Strata of every layer space, split by any of "bit", "kernel", "field"."""
        by = set(by) - {"layer"}
        if by - {"bit", "kernel", "field"} or {"bit", "field"} <= by:
            raise ConfigError(f"by: expected layer plus bit|field and/or kernel, got {by}")
        if "field" in by:
            bit_opts = [(None, self.fmt.bits_of_field(f)) for f in self.fmt.fields]
        elif "bit" in by:
            bit_opts = [(int(b), None) for b in self.resolve_bits(None, bits)]
        else:
            bit_opts = [(None, None if bits is None else tuple(self.resolve_bits(None, bits)))]
        return [Stratum(ls.target, ls.name, b, kern, bs,
                        self.population(ls.name, b, kern, bs, ls.target))
                for ls in self.layers if target in (None, ls.target)
                for kern in (range(ls.n_kernels) if "kernel" in by else [None])
                for b, bs in bit_opts]


def _output_shapes(model: nn.Module, modules: dict[str, nn.Module],
                   example_input: Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str, _m: nn.Module, _inp: object, out: object) -> None:
        if not isinstance(out, Tensor) or out.dim() < 1:
            raise ConfigError(f"layer: output of {name!r} is not a batched tensor")
        shapes.setdefault(name, tuple(out.shape[1:]))

    with forward_hooks(modules, hook), eval_mode(model), torch.no_grad():
        model(example_input)
    missing = [n for n in modules if n not in shapes]
    if missing:
        raise ConfigError(f"layer: {missing[0]!r} was not called by the example forward pass")
    return shapes
