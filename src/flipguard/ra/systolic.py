"""Systolic-array exposure model: live cycles of every value in PE registers and buffers.

Each Conv/ConvTranspose/Linear layer is lowered to GEMMs ``O[M,N] = W[M,K] @ X[K,N]``, tiled
onto an R x C array (weight-, output- or input-stationary) and run back to back. A value
counts from its write into a register or buffer until its last read there (ACE lifetime):
e.g. weight-stationary, weight (r, c) of a tile lives ``N + 2r + c`` register cycles, an X
entry one cycle per column it crosses, a partial sum one per row plus ``N + Mt - 2 + Kt'``
output-buffer cycles between K-tiles. Buffers are tracked per layer; partial sums count with
``accumulator_bits / format bits``. The full model and its assumptions:
docs/resiliency-accuracy.md ("systolic").

>>> cfg = load_systolic(None)
>>> cfg.rows, cfg.dataflow
(16, 'weight-stationary')
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flipguard.errors import ConfigError
from flipguard.faults import FORMAT_NAMES, NumberFormat
from flipguard.ra.distribution import Term
from flipguard.ra.exposure import HardwareModel, Layer, LayerGraph

__all__ = ["SystolicConfig", "SystolicModel", "load_systolic", "DEFAULT_TOML", "DATAFLOWS"]

DEFAULT_TOML = Path(__file__).parent / "hardware" / "default_systolic.toml"
_LONG = {"ws": "weight-stationary", "os": "output-stationary", "is": "input-stationary"}
DATAFLOWS = {**{v: k for k, v in _LONG.items()}, **{k: k for k in _LONG}}
DENSE_CAP = 1 << 22  # largest per-element array kept for one tensor (IS reads, col2im)


@dataclass(frozen=True)
class SystolicConfig:
    """Parameters of the array (see ``hardware/default_systolic.toml``)."""

    rows: int = 16
    cols: int = 16
    dataflow: str = "weight-stationary"
    clock_mhz: float = 500.0
    weight_kib: float = 256.0
    activation_kib: float = 512.0
    accumulator_bits: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FORMAT_NAMES, 32))
    source: str = "default"

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.dataflow not in DATAFLOWS:
            raise ConfigError(f"systolic: expected rows, cols >= 1 and a dataflow in "
                              f"{', '.join(_LONG.values())}, got {self.rows}, {self.cols}, "
                              f"{self.dataflow!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"array": {k: d[k] for k in ("rows", "cols", "dataflow", "clock_mhz")},
                "buffers": {k: d[k] for k in ("weight_kib", "activation_kib")},
                "accumulator_bits": dict(d["accumulator_bits"]), "source": self.source}


def _toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML needs Python >= 3.11 or 'tomli'") from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: hardware file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def _check(path: Path, where: str, value: Any, kind: str) -> Any:
    num = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok, want = {
        "count": (num and isinstance(value, int) and value >= 1, "a positive integer"),
        "positive": (num and value > 0, "a positive number"),
        "size": (num and value >= 0, "a non-negative number"),
        "dataflow": (value in DATAFLOWS, "one of " + ", ".join(_LONG.values())),
        "bits": (num and isinstance(value, int) and 1 <= value <= 64, "bits in 1..64"),
    }[kind]
    if not ok:
        raise ConfigError(f"{path}: field '{where}': expected {want}, got {value!r}")
    return _LONG[DATAFLOWS[value]] if kind == "dataflow" else (
        float(value) if kind in ("positive", "size") else value)


_SCHEMA = {"array": {"rows": "count", "cols": "count", "dataflow": "dataflow",
                     "clock_mhz": "positive"},
           "buffers": {"weight_kib": "size", "activation_kib": "size"},
           "accumulator_bits": dict.fromkeys(FORMAT_NAMES, "bits")}


def load_systolic(path: str | Path | None = None) -> SystolicConfig:
    """The default configuration, overlaid with the TOML file ``path`` when given; a bad
    field raises one ConfigError line naming the file and the field.

    >>> load_systolic().to_dict()["buffers"]["weight_kib"]
    256.0
    """
    values: dict[str, Any] = {}
    files = [DEFAULT_TOML] + ([Path(path)] if path else [])
    for f in files:
        data = _toml(f)
        for section, fields in data.items():
            if section not in _SCHEMA:
                raise ConfigError(f"{f}: unknown section [{section}]; expected one of "
                                  f"{', '.join(_SCHEMA)}")
            if not isinstance(fields, dict):
                raise ConfigError(f"{f}: field '{section}': expected a [{section}] table")
            for key, value in fields.items():
                kind = _SCHEMA[section].get(key)
                if kind is None:
                    raise ConfigError(f"{f}: unknown field '{section}.{key}'; expected one of "
                                      f"{', '.join(_SCHEMA[section])}")
                value = _check(f, f"{section}.{key}", value, kind)
                if section == "accumulator_bits":
                    values.setdefault("accumulator_bits", {})[key] = value
                else:
                    values[key] = value
    return SystolicConfig(**values, source=str(path) if path else "default")


def _tiles(n: int, t: int) -> np.ndarray:
    return np.array([t] * (n // t) + ([n % t] if n % t else []), dtype=np.float64)


def _loc(n_global: int, n_local: int, tile: int):
    """Per coordinate of an axis: group, tile, position in tile, tile size."""
    c = np.arange(n_global)
    grp, loc = np.divmod(c, n_local)
    t, pos = np.divmod(loc, tile)
    return grp, t, pos.astype(np.float64), _tiles(n_local, tile)[t], loc.astype(np.float64)


def _cls(shape: tuple[int, ...], axis: int, classes: np.ndarray, table: np.ndarray) -> Term:
    return Term.axis(shape, axis, None, classes, table)


def _fac(shape: tuple[int, ...], axis: int, factor: np.ndarray) -> Term:
    return Term.axis(shape, axis, np.asarray(factor, float))


def _counts(n_in: int, n_out: int, k: int, s: int, p: int, d: int) -> np.ndarray:
    """How many im2col entries read each input position of one spatial axis of a conv."""
    x = (np.arange(n_out)[:, None] * s - p + np.arange(k)[None, :] * d).ravel()
    return np.bincount(x[(x >= 0) & (x < n_in)], minlength=n_in).astype(np.float64)


def _conv_geom(layer: Layer) -> list[tuple[int, int, int, int, int, int]]:
    """(in, out, kernel, stride, padding, dilation) of each spatial axis of a conv."""
    m, out = layer.module, []
    for d in range(len(m.kernel_size)):
        n_in, n_out = layer.in_shape[1 + d], layer.out_shape[1 + d]
        k, s, dl = m.kernel_size[d], m.stride[d], m.dilation[d]
        p = m.padding[d] if not isinstance(m.padding, str) else 0 if m.padding == "valid" \
            else ((n_out - 1) * s + dl * (k - 1) + 1 - n_in) // 2  # "same"
        out.append((n_in, n_out, k, s, p, dl))
    return out


def _fold(cols: np.ndarray, layer: Layer, out_spatial: tuple[int, ...]) -> np.ndarray | None:
    """col2im of ``cols`` (channels * kernel, positions) for a 1-D/2-D conv geometry."""
    m = layer.module
    nd = len(m.kernel_size)
    if nd > 2:
        return None
    ext = (lambda v: (1, *v)) if nd == 1 else (lambda v: tuple(v))
    pads = m.padding if not isinstance(m.padding, str) else tuple(g[4] for g in _conv_geom(layer))
    t = torch.as_tensor(cols, dtype=torch.float64)[None]
    out = F.fold(t, ext(out_spatial), ext(m.kernel_size), dilation=ext(m.dilation),
                 padding=(0, *pads) if nd == 1 else tuple(pads), stride=ext(m.stride))
    return out[0].reshape(-1, *out_spatial).numpy()


class _Schedule:
    """Tiling, timing and per-value cycles of one layer under one dataflow."""

    def __init__(self, layer: Layer, cfg: SystolicConfig, acc: float) -> None:
        self.ly, self.R, self.C, self.acc = layer, cfg.rows, cfg.cols, acc
        self.df = DATAFLOWS[cfg.dataflow]
        M, K, N, R, C = layer.M, layer.K, layer.N, cfg.rows, cfg.cols
        if self.df == "os":
            self.mts, self.nts = _tiles(M, R), _tiles(N, C)
            tau = K + 2 * self.mts[:, None] + self.nts[None, :] - 3
        else:  # stationary operand (K x P), stream S
            self.P, self.S = (M, N) if self.df == "ws" else (N, M)
            self.kts, self.pts = _tiles(K, R), _tiles(self.P, C)
            tau = 2 * self.kts[None, :] + self.S + self.pts[:, None] - 2
        self.tau = tau  # (outer tiles, inner tiles) in loop order
        self.Tg = float(tau.sum())
        self.T = layer.groups * self.Tg
        self.start = (np.cumsum(tau.ravel()) - tau.ravel()).reshape(tau.shape)
        self.end = self.start + tau
        g = np.arange(layer.groups)[:, None]
        # cycles from the end of each outer tile row to the end of the layer: (groups, outer)
        self.after_row = (layer.groups - 1 - g) * self.Tg + (self.Tg - self.end[:, -1][None, :])

    # ------------------------------------------------------------------ weights, bias
    def weight_terms(self, fits: bool) -> list[Term]:
        ly = self.ly
        shape, m_axis = ly.weight_view
        k_axis = 1 - m_axis
        _, mt, mpos, _, _ = _loc(shape[m_axis], ly.M, self.C if self.df != "os" else self.R)
        _, kt, kpos, _, _ = _loc(shape[k_axis], ly.K, self.R)
        terms = []
        if self.df == "ws":
            terms += [Term.const(shape, ly.N), _fac(shape, k_axis, 2 * kpos),
                      _fac(shape, m_axis, mpos)]
            if not fits:
                cl: list[np.ndarray | None] = [None, None]
                cl[m_axis], cl[k_axis] = mt, kt
                tab = self.tau if m_axis == 0 else self.tau.T
                terms.append(Term(shape, tab, cl))
        else:
            terms.append(Term.const(shape, ly.N))
            if not fits and self.df == "is":
                terms.append(_cls(shape, k_axis, kt, self.tau.sum(axis=0)))
            elif not fits:
                terms.append(_cls(shape, m_axis, mt, self.tau.sum(axis=1)))
        if fits:
            terms.append(Term.const(shape, self.T))
        return terms

    def bias_terms(self, fits: bool, n_out: int) -> list[Term]:
        ly = self.ly
        if fits:
            return [Term.const((n_out,), self.T)]
        if ly.kind == "convT" or self.df == "is":
            return [Term.const((n_out,), self.Tg)]
        _, t, _, _, _ = _loc(n_out, ly.M, self.C if self.df == "ws" else self.R)
        return [_cls((n_out,), 0, t, self.tau.sum(axis=1))]

    # ------------------------------------------------------------------ outputs
    def output_terms(self, shape: tuple[int, int], m_axis: int) -> list[Term]:
        """Cycles of each output element on a (m, n) view (groups along the m axis)."""
        ly, acc, n_axis = self.ly, self.acc, 1 - m_axis
        M, K, N = ly.M, ly.K, ly.N
        nm = shape[m_axis]
        if self.df == "os":
            g, mt, i, mts, _ = _loc(nm, M, self.R)
            _, nt, j, nts, _ = _loc(N, N, self.C)
            rest = (ly.groups - 1 - np.arange(ly.groups))[:, None, None] * self.Tg + (
                self.Tg - self.end)[None]
            cl: list[np.ndarray | None] = [None, None]
            cl[m_axis], cl[n_axis] = g * len(self.mts) + mt, nt
            tab = rest.reshape(-1, len(self.nts))
            return [Term.const(shape, acc * K), _fac(shape, n_axis, acc * (nts - 1 - j)),
                    _fac(shape, m_axis, acc * 2 * (mts - 1 - i) + i),
                    Term(shape, tab if m_axis == 0 else tab.T, cl)]
        nk = len(self.kts)
        gap = (nk - 1) * (self.S + self.pts - 2) + (K - self.kts[0])
        if self.df == "ws":
            g, pt, c, pts, _ = _loc(nm, M, self.C)
            return [_cls(shape, m_axis, pt, acc * (K + gap)),
                    _cls(shape, m_axis, g * len(self.pts) + pt, self.after_row.ravel()),
                    _fac(shape, n_axis, N - 1 - np.arange(N)), _fac(shape, m_axis, pts - 1 - c)]
        g, _, _, _, mloc = _loc(nm, M, M)
        _, pt, c, pts, _ = _loc(N, N, self.C)
        cl = [None, None]
        cl[m_axis], cl[n_axis] = g, pt
        tab = self.after_row
        return [_cls(shape, n_axis, pt, acc * (K + gap)),
                Term(shape, tab if m_axis == 0 else tab.T, cl),
                _fac(shape, m_axis, M - 1 - mloc), _fac(shape, n_axis, pts - 1 - c)]

    # ------------------------------------------------------------------ inputs
    def entry_mean(self) -> float:
        """Mean register cycles of one X entry."""
        ly = self.ly
        if self.df != "is":
            return float(ly.M)
        return ly.M + 2 * float(np.mean(np.arange(ly.K) % self.R)) + float(
            np.mean(np.arange(ly.N) % self.C))

    def input_terms(self) -> list[Term] | None:
        """Register cycles of each element of this layer's input (None: too large)."""
        ly = self.ly
        shape = ly.in_shape
        M, R, C = ly.M, self.R, self.C
        if ly.kind == "linear" or ly.kind == "convT":
            view = (max(math.prod(shape[:-1]), 1), shape[-1]) if ly.kind == "linear" else (
                shape[0], math.prod(shape[1:]))
            k_axis = 1 if ly.kind == "linear" else 0
            if self.df != "is":
                return [Term.const(view, M)]
            kloc = _loc(view[k_axis], ly.K, R)[2]
            return [Term.const(view, M), _fac(view, k_axis, 2 * kloc),
                    _fac(view, 1 - k_axis, np.arange(view[1 - k_axis]) % C)]
        geom = _conv_geom(ly)
        counts = [_counts(*gm) for gm in geom]
        if self.df != "is":
            return [Term(shape, float(M), None, [None, *counts])]
        kk = math.prod(ly.module.kernel_size)
        if ly.groups * ly.K * ly.N <= DENSE_CAP:
            rows = np.arange(shape[0] * kk) % ly.K % R
            cols = (M + 2 * rows[:, None] + (np.arange(ly.N) % C)[None, :]).astype(float)
            dense = _fold(cols, ly, shape[1:])
            if dense is not None:
                return [Term.full(dense)]
        return [Term(shape, self.entry_mean(), None, [None, *counts])]

    def input_total(self) -> float:
        """Register cycles summed over every input element (all entries)."""
        ly, reads = self.ly, math.prod(self.ly.in_shape)
        if ly.kind == "conv":
            reads = ly.in_shape[0] * math.prod(float(_counts(*g).sum()) for g in _conv_geom(ly))
        return self.entry_mean() * reads


def _convT_output(sched: _Schedule) -> list[Term]:
    ly = sched.ly
    view = (ly.groups * ly.M, ly.N)
    if view[0] * view[1] <= DENSE_CAP:
        cols = sum(t.values(np.arange(view[0] * view[1])) for t in sched.output_terms(view, 0))
        dense = _fold(np.asarray(cols).reshape(view), ly, ly.out_shape[1:])
        if dense is not None:
            return [Term.full(dense)]
    total = sum(t.mass for t in sched.output_terms(view, 0))
    return [Term.const(ly.out_shape, total / math.prod(ly.out_shape))]


class SystolicModel(HardwareModel):
    """Exposure of an R x C systolic array, e.g. ``SystolicModel(load_systolic("hw.toml"))``."""

    name = "systolic"

    def __init__(self, config: SystolicConfig | None = None) -> None:
        self.cfg = config or load_systolic()
        self.spec = "systolic" if self.cfg.source == "default" else f"systolic:{self.cfg.source}"

    def schedules(self, graph: LayerGraph, fmt_bits: int = 32,
                  fmt_name: str = "fp32") -> list[_Schedule]:
        acc = self.cfg.accumulator_bits.get(fmt_name, 32) / fmt_bits
        return [_Schedule(layer, self.cfg, acc) for layer in graph.layers]

    def timeline(self, graph: LayerGraph, scheds: list[_Schedule]) -> tuple[np.ndarray, float]:
        ends = np.cumsum([s.T for s in scheds])
        return ends, float(ends[-1] + math.ceil(graph.output_numel / self.cfg.cols))

    def terms(self, graph: LayerGraph, fmt: NumberFormat) -> dict[tuple[str, str], list[Term]]:
        cfg, fmt_bits = self.cfg, fmt.bits
        scheds = self.schedules(graph, fmt_bits, fmt.name)
        ends, total = self.timeline(graph, scheds)
        readout = total - ends[-1]
        out: dict[tuple[str, str], list[Term]] = {}
        for i, (layer, s) in enumerate(zip(graph.layers, scheds, strict=True)):
            w = layer.module.weight
            fits = w.numel() * fmt_bits / 8 <= cfg.weight_kib * 1024
            out[("weight", layer.name)] = s.weight_terms(fits)
            b = getattr(layer.module, "bias", None)
            if isinstance(b, torch.Tensor):
                out[("bias", layer.name)] = s.bias_terms(fits, b.numel())
            if layer.kind == "convT":
                terms = _convT_output(s)
            elif layer.kind == "linear":
                terms = s.output_terms((layer.N, layer.M), 1)
            else:
                terms = s.output_terms((layer.groups * layer.M, layer.N), 0)
            numel = math.prod(layer.out_shape)
            on_chip = numel * fmt_bits / 8 <= cfg.activation_kib * 1024
            ends_of = [ends[u.consumer] if u.consumer < len(scheds) else total
                       for u in layer.uses]
            durs = [scheds[u.consumer].T if u.consumer < len(scheds) else readout
                    for u in layer.uses if u.reads]
            buf = (max(ends_of) - ends[i] if on_chip else sum(durs)) if layer.uses else 0.0
            terms.append(Term.const(layer.out_shape, buf))
            for u in layer.uses:
                if u.consumer >= len(scheds) or not u.reads:
                    continue
                reader = scheds[u.consumer]
                exact = u.exact and math.prod(reader.ly.in_shape) == numel
                got = reader.input_terms() if exact else None
                mean = reader.input_total() / math.prod(reader.ly.in_shape)  # not aligned
                terms += got if got is not None else [Term.const(layer.out_shape, mean)]
            out[("activation", layer.name)] = terms
        return out

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def info(self, graph: LayerGraph) -> dict[str, Any]:
        scheds = self.schedules(graph)
        total = self.timeline(graph, scheds)[1]
        return {"cycles": total, "latency_s": total / (self.cfg.clock_mhz * 1e6),
                "layer_cycles": {s.ly.name: s.T for s in scheds}}

