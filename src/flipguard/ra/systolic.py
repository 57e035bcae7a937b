"""Systolic-array exposure model: bit-cycles of every value in each storage structure.

Each Conv/ConvTranspose/Linear layer is lowered to GEMMs ``O[M,N] = W[M,K] @ X[K,N]``, tiled
onto an R x C array (weight-, output- or input-stationary) and run back to back. A value
counts from its write into a register or buffer until its last read there (ACE lifetime),
in the structure that holds it: PE registers (flip-flops), weight / activation / output
(accumulator) buffers (SRAM, capacities from the TOML) and DRAM. Occupancy never exceeds a
buffer's capacity: the stream dimension is split into chunks whose partial sums fit the
output buffer, a layer's weights that do not fit are staged one tile at a time, and live
activations share the activation buffer by water-filling (:mod:`flipguard.ra.buffers`),
the rest in DRAM. Partial sums count per accumulator bit and reach the output through
requantisation (:mod:`flipguard.ra.accumulator`). Parameters: :mod:`flipguard.ra.hwconfig`;
model and assumptions: docs/exposure-models.md.

>>> cfg = load_systolic(None)
>>> cfg.rows, cfg.dataflow
(16, 'weight-stationary')
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flipguard.faults import FloatFormat, NumberFormat
from flipguard.ra.accumulator import psum_map, requant_ratio
from flipguard.ra.buffers import ActivationPlacement, place_activations
from flipguard.ra.distribution import Term
from flipguard.ra.graph import Layer, LayerGraph
from flipguard.ra.hwconfig import DATAFLOWS, DEFAULT_TOML, SystolicConfig, load_systolic
from flipguard.ra.hwmodel import HardwareModel
from flipguard.ra.structures import SiteExposure, scaled

__all__ = ["SystolicConfig", "SystolicModel", "load_systolic", "DEFAULT_TOML", "DATAFLOWS"]

DENSE_CAP = 1 << 22  # largest per-element array kept for one tensor (IS reads, col2im)
Key = tuple[str, str]


def _tiles(n: int, t: int) -> np.ndarray:
    return np.array([t] * (n // t) + ([n % t] if n % t else []), dtype=np.float64)


def _loc(n_global: int, n_local: int, tile: int):
    """Per coordinate of an axis: group, tile, position in tile, tile size, local index."""
    c = np.arange(n_global)
    grp, loc = np.divmod(c, n_local)
    t, pos = np.divmod(loc, tile)
    return grp, t, pos.astype(np.float64), _tiles(n_local, tile)[t], loc.astype(np.float64)


def _mn(shape: tuple[int, int], m_axis: int, table: Any = 1.0, cls_m=None, cls_n=None,
        fac_m=None, fac_n=None) -> Term:
    """Term ``table[cls_m, cls_n] * fac_m * fac_n`` on a 2-D view whose GEMM M axis (or a
    weight's M axis; ``n`` is then its K axis) lies at ``m_axis``."""
    tab = np.asarray(table, dtype=np.float64).reshape(
        (1, 1) if np.ndim(table) == 0 else np.shape(table))
    cl, fa = [cls_m, cls_n], [fac_m, fac_n]
    if m_axis == 1:
        tab, cl, fa = tab.T, cl[::-1], fa[::-1]
    return Term(shape, tab, cl, fa)


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
    """Tiling, timing and per-value register / buffer cycles of one layer. Weight- and
    input-stationary: loop P-tile > stream chunk > K-tile (``tau[p, c, k]``); output-
    stationary: M-tile > N-tile (``tau[m, n]``)."""

    def __init__(self, layer: Layer, cfg: SystolicConfig, acc_bits: int, fmt_bits: int) -> None:
        self.ly, self.R, self.C = layer, cfg.rows, cfg.cols
        self.df = DATAFLOWS[cfg.dataflow]
        M, K, N, R, C = layer.M, layer.K, layer.N, cfg.rows, cfg.cols
        cap = cfg.capacity_bits("output_buffer")
        if self.df == "os":
            self.mts, self.nts = _tiles(M, R), _tiles(N, C)
            tau = K + 2 * self.mts[:, None] + self.nts[None, :] - 3
            block = self.mts.max() * self.nts.max() * acc_bits
            self.nch, self.sc = 1, N
        else:  # stationary operand (K x P), stream S, chunked so a P-tile x chunk block fits
            self.P, self.S = (M, N) if self.df == "ws" else (N, M)
            self.kts, self.pts = _tiles(K, R), _tiles(self.P, C)
            pmax = float(self.pts.max())
            self.sc = self.S if self.S * pmax * acc_bits <= cap else max(
                1, int(cap // (pmax * acc_bits)))
            self.scs = _tiles(self.S, self.sc)
            self.nch = len(self.scs)
            tau = (2 * self.kts[None, None, :] + self.scs[None, :, None]
                   + self.pts[:, None, None] - 2)
            block = pmax * self.sc * acc_bits
        self.f_ob = 1.0 if block <= cap else cap / block
        self.tau = tau
        self.Tg = float(tau.sum())
        self.T = layer.groups * self.Tg
        end = np.cumsum(tau.ravel()).reshape(tau.shape)
        row_end = end if self.df == "os" else end[..., -1]
        g = np.arange(layer.groups)[:, None, None]
        # cycles from the drain of each output block to the end of the layer: (groups, a, b)
        self.after = (layer.groups - 1 - g) * self.Tg + (self.Tg - row_end)[None]

    def stage_bits(self, fmt_bits: int) -> float:
        """Weight bits staged in the weight buffer at a time when a layer does not fit."""
        if self.df == "os":
            return float(self.mts.max() * self.ly.K * fmt_bits)
        p = self.pts.max() if self.df == "ws" else self.sc
        return float(p * self.kts.max() * fmt_bits)

    # ------------------------------------------------------------------ weights, bias
    def weight_terms(self, fits: bool, f_w: float) -> tuple[list[Term], list[Term]]:
        """(PE register terms, weight-buffer terms) of the weight."""
        ly = self.ly
        shape, m_axis = ly.weight_view
        k_axis = 1 - m_axis
        kt = _loc(shape[k_axis], ly.K, self.R)[1]
        if self.df == "ws":
            _, pt, mpos, _, _ = _loc(shape[m_axis], ly.M, self.C)
            kpos = _loc(shape[k_axis], ly.K, self.R)[2]
            pe = [Term.const(shape, ly.N), _mn(shape, m_axis, 2 * self.nch, fac_n=kpos),
                  _mn(shape, m_axis, self.nch, fac_m=mpos)]
            staged = _mn(shape, m_axis, self.tau.sum(axis=1), pt, kt)
        elif self.df == "is":
            chunk = _loc(shape[m_axis], ly.M, self.sc)[1]
            pe = [Term.const(shape, ly.N)]
            staged = _mn(shape, m_axis, self.tau.sum(axis=0), chunk, kt)
        else:
            mt = _loc(shape[m_axis], ly.M, self.R)[1]
            pe = [Term.const(shape, ly.N)]
            staged = _mn(shape, m_axis, self.tau.sum(axis=1)[:, None], mt)
        buf = [Term.const(shape, self.T)] if fits else [scaled(staged, f_w)] if f_w > 0 else []
        return pe, buf

    def bias_terms(self, fits: bool, f_w: float, n_out: int) -> list[Term]:
        ly = self.ly
        if fits:
            return [Term.const((n_out,), self.T)]
        if f_w <= 0:
            return []
        if ly.kind == "convT" or self.df == "is":
            return [Term.const((n_out,), self.Tg * f_w)]
        t = _loc(n_out, ly.M, self.C if self.df == "ws" else self.R)[1]
        per = self.tau.sum(axis=(1, 2)) if self.df == "ws" else self.tau.sum(axis=1)
        return [Term.axis((n_out,), 0, None, t, per * f_w)]

    # ------------------------------------------------------------------ outputs
    def output_terms(self, shape: tuple[int, int], m_axis: int) -> dict[str, list[Term]]:
        """Cycles of each output element on a (m, n) view (groups along the m axis):
        ``pe`` / ``ob`` per accumulator bit (PE registers / output buffer), ``after`` per
        stored bit, from its drain out of the accumulator to the end of the layer."""
        ly = self.ly
        M, K, N = ly.M, ly.K, ly.N
        nm = shape[m_axis]
        if self.df == "os":
            g, mt, i, mts, _ = _loc(nm, M, self.R)
            _, nt, j, nts, _ = _loc(N, N, self.C)
            after = self.after.reshape(-1, len(self.nts))
            return {"pe": [Term.const(shape, K), _mn(shape, m_axis, fac_n=nts - 1 - j),
                           _mn(shape, m_axis, fac_m=2 * (mts - 1 - i))],
                    "ob": [_mn(shape, m_axis, fac_m=i)],
                    "after": [_mn(shape, m_axis, after, g * len(self.mts) + mt, nt)]}
        nk, npt = len(self.kts), len(self.pts)
        gap = ((nk - 1) * (self.scs[None, :] + self.pts[:, None] - 2)
               + (K - self.kts[0]))  # (p, c)
        if self.df == "ws":
            g, pt, col, pts, _ = _loc(nm, M, self.C)
            _, ch, nloc, scs, _ = _loc(N, N, self.sc)
            after = self.after.reshape(-1, self.nch)
            return {"pe": [Term.const(shape, K)],
                    "ob": [_mn(shape, m_axis, gap, pt, ch),
                           _mn(shape, m_axis, fac_n=scs - 1 - nloc),
                           _mn(shape, m_axis, fac_m=pts - 1 - col)],
                    "after": [_mn(shape, m_axis, after, g * npt + pt, ch)]}
        g, ch, mloc, scs, _ = _loc(nm, M, self.sc)
        _, pt, col, pts, _ = _loc(N, N, self.C)
        after = self.after.transpose(0, 2, 1).reshape(-1, npt)
        return {"pe": [Term.const(shape, K)],
                "ob": [_mn(shape, m_axis, gap.T, ch, pt),
                       _mn(shape, m_axis, fac_m=scs - 1 - mloc),
                       _mn(shape, m_axis, fac_n=pts - 1 - col)],
                "after": [_mn(shape, m_axis, after, g * self.nch + ch, pt)]}

    # ------------------------------------------------------------------ inputs
    def entry_mean(self) -> float:
        """Mean register cycles of one X entry."""
        ly = self.ly
        if self.df != "is":
            return float(ly.M)
        return ly.M + self.nch * (2 * float(np.mean(np.arange(ly.K) % self.R)) + float(
            np.mean(np.arange(ly.N) % self.C)))

    def input_terms(self) -> list[Term] | None:
        """Register cycles of each element of this layer's input (None: too large)."""
        ly = self.ly
        shape = ly.in_shape
        M, R, C, nch = ly.M, self.R, self.C, self.nch
        if ly.kind == "linear" or ly.kind == "convT":
            view = (max(math.prod(shape[:-1]), 1), shape[-1]) if ly.kind == "linear" else (
                shape[0], math.prod(shape[1:]))
            k_axis = 1 if ly.kind == "linear" else 0
            if self.df != "is":
                return [Term.const(view, M)]
            kloc = _loc(view[k_axis], ly.K, R)[2]
            return [Term.const(view, M), Term.axis(view, k_axis, 2 * nch * kloc),
                    Term.axis(view, 1 - k_axis, nch * (np.arange(view[1 - k_axis]) % C))]
        counts = [_counts(*gm) for gm in _conv_geom(ly)]
        if self.df != "is":
            return [Term(shape, float(M), None, [None, *counts])]
        kk = math.prod(ly.module.kernel_size)
        if ly.groups * ly.K * ly.N <= DENSE_CAP:
            rows = np.arange(shape[0] * kk) % ly.K % R
            cols = (M + nch * (2 * rows[:, None] + (np.arange(ly.N) % C)[None, :])).astype(float)
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


def _convT_output(sched: _Schedule) -> dict[str, list[Term]]:
    """Output terms of a transposed conv: GEMM columns folded back with col2im (partial
    words add up; the stored output's time after the drain is the mean of its parts)."""
    ly = sched.ly
    view = (ly.groups * ly.M, ly.N)
    parts = sched.output_terms(view, 0)
    numel, out_numel = view[0] * view[1], math.prod(ly.out_shape)
    if numel <= DENSE_CAP:
        idx = np.arange(numel)
        ones = _fold(np.ones(view), ly, ly.out_shape[1:])
        folded = {}
        for key, ts in parts.items():
            dense = _fold(np.asarray(sum(t.values(idx) for t in ts)).reshape(view), ly,
                          ly.out_shape[1:])
            if dense is None or ones is None:
                break
            if key == "after":
                dense = np.divide(dense, ones, out=np.zeros_like(dense), where=ones > 0)
            folded[key] = [Term.full(dense)]
        else:
            return folded
    return {key: [Term.const(ly.out_shape, sum(t.mass for t in ts) / (
        numel if key == "after" else out_numel))] for key, ts in parts.items()}


class SystolicModel(HardwareModel):
    """Exposure of an R x C systolic array, e.g. ``SystolicModel(load_systolic("hw.toml"))``."""

    name = "systolic"

    def __init__(self, config: SystolicConfig | None = None) -> None:
        self.cfg = config or load_systolic()
        self.spec = "systolic" if self.cfg.source == "default" else f"systolic:{self.cfg.source}"

    def acc_bits(self, fmt: NumberFormat) -> int:
        return int(self.cfg.accumulator_bits.get(fmt.name, 32))

    def schedules(self, graph: LayerGraph, fmt_bits: int = 32,
                  fmt_name: str = "fp32") -> list[_Schedule]:
        acc = self.cfg.accumulator_bits.get(fmt_name, 32)
        return [_Schedule(layer, self.cfg, acc, fmt_bits) for layer in graph.layers]

    def timeline(self, graph: LayerGraph, scheds: list[_Schedule]) -> tuple[np.ndarray, float]:
        ends = np.cumsum([s.T for s in scheds])
        return ends, float(ends[-1] + math.ceil(graph.output_numel / self.cfg.cols))

    def structure_weights(self, raw: bool = False) -> dict[str, float]:
        return self.cfg.structure_weights(raw)

    def upset_rate(self, structure: str) -> float | None:
        return self.cfg.upset_rate(structure)

    def placement(self, graph: LayerGraph, fmt: NumberFormat
                  ) -> tuple[list[_Schedule], np.ndarray, float, ActivationPlacement]:
        """Schedules, layer end cycles, total cycles and the activation-buffer placement."""
        scheds = self.schedules(graph, fmt.bits, fmt.name)
        ends, total = self.timeline(graph, scheds)
        durations = np.array([s.T for s in scheds] + [total - ends[-1]])
        last = []
        for i, layer in enumerate(graph.layers):
            c = max((u.consumer for u in layer.uses), default=None)
            last.append(None if c is None or c <= i else c)  # <= i: fused at its drain
        bits = np.array([math.prod(ly.out_shape) * fmt.bits for ly in graph.layers], float)
        pl = place_activations(durations, last, bits,
                               self.cfg.capacity_bits("activation_buffer"))
        return scheds, ends, total, pl

    def exposure(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, SiteExposure]:
        cfg, fb = self.cfg, fmt.bits
        scheds, _, total, pl = self.placement(graph, fmt)
        cap_w = cfg.capacity_bits("weight_buffer")
        out: dict[Key, SiteExposure] = {}
        for i, (layer, s) in enumerate(zip(graph.layers, scheds, strict=True)):
            w = layer.module.weight
            b = getattr(layer.module, "bias", None)
            b = b if isinstance(b, torch.Tensor) else None
            fits = (w.numel() + (0 if b is None else b.numel())) * fb <= cap_w
            f_w = 1.0 if fits else min(1.0, cap_w / s.stage_bits(fb))
            pe, buf = s.weight_terms(fits, f_w)
            dram = [Term.const(tuple(w.shape), total)]
            out[("weight", layer.name)] = SiteExposure(
                {"pe": pe, "weight_buffer": buf, "dram": dram})
            if b is not None:
                out[("bias", layer.name)] = SiteExposure(
                    {"weight_buffer": s.bias_terms(fits, f_w, b.numel()),
                     "dram": [Term.const((b.numel(),), total)]})
            if layer.kind == "convT":
                parts = _convT_output(s)
            elif layer.kind == "linear":
                parts = s.output_terms((layer.N, layer.M), 1)
            else:
                parts = s.output_terms((layer.groups * layer.M, layer.N), 0)
            word: dict[str, list[Term]] = {"pe": self._reads(layer, scheds)}
            if i in pl.live[i]:  # has a life in the activation buffer / DRAM
                d = float(pl.during[i])
                word["activation_buffer"] = [scaled(t, d) for t in parts["after"]] + [
                    Term.const(layer.out_shape, pl.on_chip[i])]
                word["dram"] = [scaled(t, 1.0 - d) for t in parts["after"]] + [
                    Term.const(layer.out_shape, pl.dram[i])]
            acc = {"pe": parts["pe"], "output_buffer": [scaled(t, s.f_ob) for t in parts["ob"]],
                   "dram": [scaled(t, 1.0 - s.f_ob) for t in parts["ob"] if s.f_ob < 1]}
            ratio = None if isinstance(fmt, FloatFormat) else requant_ratio(
                float(w.detach().abs().max()), layer.in_amax, layer.out_amax, layer.K)
            out[("activation", layer.name)] = SiteExposure(
                word, acc, psum_map(fmt, self.acc_bits(fmt), ratio))
        return out

    def _reads(self, layer: Layer, scheds: list[_Schedule]) -> list[Term]:
        """PE register cycles of this output while its readers stream it through the array."""
        terms: list[Term] = []
        numel = math.prod(layer.out_shape)
        for u in layer.uses:
            if u.consumer >= len(scheds) or not u.reads:
                continue
            reader = scheds[u.consumer]
            exact = u.exact and math.prod(reader.ly.in_shape) == numel
            got = reader.input_terms() if exact else None
            mean = reader.input_total() / math.prod(reader.ly.in_shape)  # not aligned
            terms += got if got is not None else [Term.const(layer.out_shape, mean)]
        return terms

    def terms(self, graph: LayerGraph, fmt: NumberFormat) -> dict[Key, list[Term]]:
        """Bit-averaged element weights per tensor (see :meth:`exposure` for the parts)."""
        w = self.structure_weights()
        return {k: se.combined(w, fmt.bits) for k, se in self.exposure(graph, fmt).items()}

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def info(self, graph: LayerGraph, fmt: NumberFormat | None = None) -> dict[str, Any]:
        bits, name = (fmt.bits, fmt.name) if fmt is not None else (32, "fp32")
        scheds = self.schedules(graph, bits, name)
        total = self.timeline(graph, scheds)[1]
        return {"cycles": total, "latency_s": total / (self.cfg.clock_mhz * 1e6),
                "layer_cycles": {s.ly.name: s.T for s in scheds},
                "stream_chunks": {s.ly.name: s.nch for s in scheds if s.nch > 1}}
