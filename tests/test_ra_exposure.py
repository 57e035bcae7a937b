"""Exposure models: hand-checked cycle counts, a cycle-level systolic simulator, sampling.

The per-structure rules (capacities, rates, SEC-DED, accumulators, TOML) are tested in
tests/test_ra_structures.py."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.faults import get_format
from flipguard.ra import (
    Block,
    MemoryModel,
    SystolicModel,
    analyse,
    build_exposure,
)
from flipguard.ra.systolic import SystolicConfig


def _cycles(net: nn.Module, x: torch.Tensor, hw, target: str, layer: str) -> np.ndarray:
    """Per-element live cycles of one tensor (element weight of its block)."""
    p = build_exposure(net, x, hw, targets=("weight", "bias", "activation"))
    b = p.block(target, layer)
    assert b is not None
    return b.element_weights(np.arange(b.numel)).reshape(b.shape)


def _systolic(dataflow: str, rows: int = 2, cols: int = 2, **kw) -> SystolicModel:
    return SystolicModel(SystolicConfig(rows=rows, cols=cols, dataflow=dataflow, **kw))


def _mlp(*dims: int, bias: bool = False) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# --------------------------------------------------------------------------- hand-checked
def test_weight_stationary_hand_checked_two_layer_mlp():
    # Linear(3,3) -> ReLU -> Linear(3,2) on a 2x2 array, one input vector (N = 1).
    # Layer 1 tiles (M-tile, K-tile) take 2Kt + N + Mt - 2 = 5, 3, 4, 2 cycles (T1 = 14),
    # layer 2 tiles 5, 3 (T2 = 8); the host reads the 2 outputs in ceil(2/2) = 1 cycle.
    net, x = _mlp(3, 3, 2), torch.zeros(1, 3)
    hw = _systolic("ws")
    # weight (r, c) of a tile: N + 2r + c register cycles, + the whole layer in the buffer
    w1 = [[1 + 0 + 0, 1 + 2 + 0, 1 + 0 + 0], [1 + 0 + 1, 1 + 2 + 1, 1 + 0 + 1], [1, 3, 1]]
    assert _cycles(net, x, hw, "weight", "0").tolist() == (np.array(w1) + 14).tolist()
    assert _cycles(net, x, hw, "weight", "2").tolist() == [[9, 11, 9], [10, 12, 10]]
    # hidden h_m: partial sums 3 rows (K) + output-buffer gap between K-tiles (2, 2, 1)
    # + final value in the output buffer until layer 1 ends (7, 6, 0) + activation buffer
    # until layer 2 ends (8) + streamed through layer 2's two columns (2).
    hidden = [3 + 2 + 7 + 8 + 2, 3 + 2 + 6 + 8 + 2, 3 + 1 + 0 + 8 + 2]
    assert _cycles(net, x, hw, "activation", "0").tolist() == hidden
    # outputs: 3 + gap 2 + final (1, 0) + read by the host (1)
    assert _cycles(net, x, hw, "activation", "2").tolist() == [7, 6]


def test_output_stationary_hand_checked_linear():
    # Linear(3,3) on a 2x2 array, OS: M-tiles of 2 and 1 rows, one N column; a tile takes
    # K + 2Mt + Nt - 3 cycles = 5 and 3 (T = 8); the host reads 3 outputs in 2 cycles.
    net, x = nn.Linear(3, 3, bias=False), torch.zeros(1, 3)
    hw = _systolic("os")
    # each weight crosses the N = 1 column once and sits in the buffer for the layer
    assert _cycles(net, x, hw, "weight", "").tolist() == [[9] * 3] * 3
    # output (i, j): K + (Nt-1-j) + 2(Mt-1-i) in the PE, then the output buffer until the
    # layer ends (3 + i, 3 + i, 0), then 2 cycles until the host has read it
    assert _cycles(net, x, hw, "activation", "").tolist() == [3 + 2 + 3 + 2, 3 + 4 + 2,
                                                              3 + 0 + 2]


def test_memory_model_hand_checked():
    net, x = _mlp(3, 3, 2, bias=True), torch.zeros(1, 3)
    hw = MemoryModel(macs_per_cycle=3, words_per_cycle=1)
    # layers take 9/3 = 3 and 6/3 = 2 cycles, reading 2 outputs 2: total 7
    assert _cycles(net, x, hw, "weight", "0").tolist() == [[7.0] * 3] * 3
    assert _cycles(net, x, hw, "bias", "2").tolist() == [7.0, 7.0]
    assert _cycles(net, x, hw, "activation", "0").tolist() == [2.0] * 3  # 5 - 3
    assert _cycles(net, x, hw, "activation", "2").tolist() == [2.0] * 2  # 7 - 5
    p = build_exposure(net, x, hw, targets=("weight", "activation"))
    total = 7 * (9 + 6) + 2 * 3 + 2 * 2
    assert math.isclose(p.shares()["activation"], 10 / total)


def test_uniform_is_bits_times_elements():
    net = _mlp(4, 3, 2, bias=True)
    p = build_exposure(net, torch.zeros(1, 4), "uniform", ("weight", "bias", "activation"),
                       fmt="fp16")
    assert p.total == 16 * (12 + 6 + 3 + 2 + 3 + 2)
    sites, prob = p.enumerate()
    assert np.allclose(prob, 1 / p.total) and len(sites) == p.total


# --------------------------------------------------------------------------- simulator
class _Regs:
    """ACE bookkeeping: a value counts from its write until its last read (per register)."""

    def __init__(self) -> None:
        self.state: dict = {}
        self.live: dict = defaultdict(float)

    def read(self, reg, t):
        st = self.state[reg]
        st[2] = t
        return st[0]

    def write(self, reg, token, t):
        self._close(reg)
        self.state[reg] = [token, t, None]

    def _close(self, reg):
        st = self.state.pop(reg, None)
        if st is not None and st[2] is not None:
            self.live[st[0]] += st[2] - st[1]

    def finish(self, t_end):
        for reg in [r for r in self.state if r[0] == "ob"]:
            self.read(reg, t_end)
        for reg in list(self.state):
            self._close(reg)
        return self.live


def _sim_ws(M, K, N, R, C, nc=None):
    """Cycle-level weight-stationary array: W (K rows x M cols) loaded from the top, X
    streamed from the left with skew, partial sums down the columns into an output buffer;
    loop M-tile > N-chunk of ``nc`` columns (default all N) > K-tile."""
    g, t0, nc = _Regs(), 0, nc or N
    for m0, n0 in ((m0, n0) for m0 in range(0, M, C) for n0 in range(0, N, nc)):
        ms = list(range(m0, min(M, m0 + C)))
        Nc = min(nc, N - n0)
        for k0 in range(0, K, R):
            ks = list(range(k0, min(K, k0 + R)))
            Kt, Mt = len(ks), len(ms)
            for ld in range(Kt):  # shift weights down one row per cycle
                toks = {(i, c): g.read(("w", i - 1, c), t0 + ld)
                        for i in range(min(ld, Kt - 1), 0, -1) for c in range(Mt)}
                for (i, c), tok in toks.items():
                    g.write(("w", i, c), tok, t0 + ld)
                for c in range(Mt):
                    g.write(("w", 0, c), ("W", ms[c], ks[Kt - 1 - ld]), t0 + ld)
            ts, S = t0 + Kt, Nc + Kt + Mt - 2
            for s in range(-1, S + 1):
                t, writes = ts + s, []
                for r in range(Kt):
                    for c in range(Mt):
                        n = s - r - c
                        if 0 <= n < Nc:
                            g.read(("w", r, c), t)
                            g.read(("a", r, c), t)
                            if c + 1 < Mt:
                                writes.append((("a", r, c + 1), ("X", ks[r], n0 + n)))
                            if r > 0:
                                g.read(("p", r - 1, c), t)
                            elif k0 > 0:
                                g.read(("ob", ms[c], n0 + n), t)
                            writes.append((("p", r, c), ("P", ms[c], n0 + n)))
                    if 0 <= s + 1 - r < Nc:
                        writes.append((("a", r, 0), ("X", ks[r], n0 + s + 1 - r)))
                for c in range(Mt):
                    n = s - Kt - c
                    if 0 <= n < Nc:
                        writes.append((("ob", ms[c], n0 + n), g.read(("p", Kt - 1, c), t)))
                for reg, tok in writes:
                    g.write(reg, tok, t)
            t0 = ts + S
    return g.finish(t0), t0


def _sim_os(M, K, N, R, C):
    """Cycle-level output-stationary array: W from the left, X from the top, outputs
    accumulate in place and drain down the columns into the output buffer."""
    g, t0 = _Regs(), 0
    for m0 in range(0, M, R):
        ms = list(range(m0, min(M, m0 + R)))
        for n0 in range(0, N, C):
            ns = list(range(n0, min(N, n0 + C)))
            Mt, Nt = len(ms), len(ns)
            E = K + Mt + Nt - 2
            for s in range(-1, E + Mt):
                t, writes = t0 + s, []
                for i in range(Mt):
                    for j in range(Nt):
                        k = s - i - j
                        if 0 <= k < K:
                            g.read(("wi", i, j), t)
                            g.read(("xi", i, j), t)
                            if j + 1 < Nt:
                                writes.append((("wi", i, j + 1), ("W", ms[i], k)))
                            if i + 1 < Mt:
                                writes.append((("xi", i + 1, j), ("X", k, ns[j])))
                            if k > 0:
                                g.read(("acc", i, j), t)
                            writes.append((("acc", i, j), ("P", ms[i], ns[j])))
                for i in range(Mt):
                    if 0 <= s + 1 - i < K:
                        writes.append((("wi", i, 0), ("W", ms[i], s + 1 - i)))
                for j in range(Nt):
                    if 0 <= s + 1 - j < K:
                        writes.append((("xi", 0, j), ("X", s + 1 - j, ns[j])))
                if s >= E:
                    d = s - E
                    for j in range(Nt):
                        writes.append((("ob", ms[Mt - 1 - d], ns[j]),
                                       g.read(("acc", Mt - 1, j), t)))
                        for i in range(Mt - 1, d, -1):
                            writes.append((("acc", i, j), g.read(("acc", i - 1, j), t)))
                for reg, tok in writes:
                    g.write(reg, tok, t)
            t0 += E + Mt - 1
    return g.finish(t0), t0


def _sim(dataflow, M, K, N, R, C, nc=None):
    """Per-value live cycles {("W", m, k), ("X", k, n), ("P", m, n)} and layer cycles
    (``nc``: stream chunk of WS / IS)."""
    if dataflow == "ws":
        return _sim_ws(M, K, N, R, C, nc)
    if dataflow == "os":
        return _sim_os(M, K, N, R, C)
    live, T = _sim_ws(N, K, M, R, C, nc)  # input-stationary = WS with (W, M) <-> (X, N)
    swap = {"W": "X", "X": "W", "P": "P"}
    return {(swap[kind], b, a): v for (kind, a, b), v in live.items()}, T


_DIMS = [(3, 3, 2, 4, 2, 2), (5, 4, 3, 3, 2, 3), (2, 5, 4, 1, 3, 2)]
_CASES = [(df, dims, chunked) for chunked in (False, True) for df in ("ws", "os", "is")
          for dims in _DIMS  # chunking needs a stream to split: not OS, not a 1-column WS
          if not (chunked and (df == "os" or (df == "ws" and dims[3] == 1)))]


@pytest.mark.parametrize("dataflow, dims, chunked", _CASES)
def test_systolic_matches_cycle_simulation(dataflow, dims, chunked):
    """Two Linear layers on (T, features) inputs: every weight, hidden and output value's
    live cycles (all structures together, equal rates) equal a register-level simulation
    plus the buffer rules; ``chunked``: a 16-byte output buffer splits the WS / IS stream
    into chunks whose partial sums fit, and the simulation runs the same loop."""
    k1, k2, m2, n, rows, cols = dims
    net, x = _mlp(k1, k2, m2), torch.zeros(1, n, k1)
    hw = _systolic(dataflow, rows, cols, **({"output_kib": 16 / 1024} if chunked else {}))
    s1, s2 = hw.schedules(analyse(net, x))
    assert max(s1.nch, s2.nch) > 1 if chunked else s1.nch == s2.nch == 1
    live1, t1 = _sim(dataflow, k2, k1, n, rows, cols, s1.sc)
    live2, t2 = _sim(dataflow, m2, k2, n, rows, cols, s2.sc)
    readout = math.ceil(n * m2 / cols)
    w1, w2 = (_cycles(net, x, hw, "weight", name) for name in ("0", "2"))
    assert w1.tolist() == [[live1[("W", m, k)] + t1 for k in range(k1)] for m in range(k2)]
    assert w2.tolist() == [[live2[("W", m, k)] + t2 for k in range(k2)] for m in range(m2)]
    h = _cycles(net, x, hw, "activation", "0")
    assert h.tolist() == [[live1[("P", k, i)] + t2 + live2[("X", k, i)] for k in range(k2)]
                          for i in range(n)]
    out = _cycles(net, x, hw, "activation", "2")
    assert out.tolist() == [[live2[("P", m, i)] + readout for m in range(m2)] for i in range(n)]


def test_weight_buffer_overflow_uses_tile_durations():
    # 9 weights x 4 B = 36 B do not fit a 20 B buffer; a 2 x 2 tile (16 B) does, so each
    # weight is in the buffer only while its tile runs (before: capacity 0 did the same,
    # which let a buffer without room hold a tile; a 0 B buffer now holds nothing)
    net, x = nn.Linear(3, 3, bias=False), torch.zeros(1, 3)
    small = _cycles(net, x, _systolic("ws", weight_kib=20 / 1024), "weight", "")
    none = _cycles(net, x, _systolic("ws", weight_kib=0.0), "weight", "")
    big = _cycles(net, x, _systolic("ws"), "weight", "")
    tau = np.array([[5, 3], [4, 2]])  # (M-tile, K-tile) durations, see the hand-checked test
    cls_m, cls_k = np.array([0, 0, 1]), np.array([0, 0, 1])
    assert (small - (big - 14)).tolist() == tau[cls_m][:, cls_k].tolist()
    assert none.tolist() == (big - 14).tolist()  # PE registers only (DRAM: SEC-DED)


# --------------------------------------------------------------------------- convolutions
def _im2col_reads(conv: nn.Conv2d, shape) -> np.ndarray:
    """How often each input element appears in the im2col matrix (brute force)."""
    c, h, w = shape
    idx = torch.arange(c * h * w, dtype=torch.float64).reshape(1, c, h, w) + 1
    cols = torch.nn.functional.unfold(idx, conv.kernel_size, conv.dilation, conv.padding,
                                      conv.stride)
    v = cols.reshape(-1).long()
    return np.bincount(v[v > 0].numpy() - 1, minlength=c * h * w).reshape(shape)


@pytest.mark.parametrize("dataflow", ["ws", "os", "is"])
def test_conv_consumer_reads_match_im2col(dataflow):
    conv2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    net = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.ReLU(), conv2)
    x = torch.zeros(1, 1, 6, 5)
    hw = _systolic(dataflow, 2, 3)
    g = analyse(net, x)
    hidden_shape = g.layers[0].out_shape
    reads = _im2col_reads(conv2, hidden_shape)
    # the hidden tensor's PE word terms are exactly conv2's reads (its own register time as a
    # partial sum counts per accumulator bit)
    terms = hw.exposure(g, get_format("fp32"))[("activation", "0")].word["pe"]
    got = Block("activation", "0", hidden_shape, np.ones(1), terms)
    per = got.element_weights(np.arange(got.numel)).reshape(hidden_shape)
    if dataflow != "is":  # X streams through the M = 3 output channels of conv2
        assert per.tolist() == (3 * reads).tolist()
    else:  # X[k, n] pinned: M + 2 (k mod R) + (n mod C) per im2col entry (brute force)
        kk, (oh, ow) = 9, g.layers[1].out_shape[1:]
        want = np.zeros(hidden_shape)
        for ci in range(2):
            for ki in range(3):
                for kj in range(3):
                    for a in range(oh):
                        for b in range(ow):
                            i, j = a * 2 - 1 + ki, b * 2 - 1 + kj
                            if 0 <= i < hidden_shape[1] and 0 <= j < hidden_shape[2]:
                                k, n = ci * kk + ki * 3 + kj, a * ow + b
                                want[ci, i, j] += 3 + 2 * (k % 2) + n % 3
        assert np.allclose(per, want)


def test_transposed_conv_output_folds_gemm_columns():
    convt = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, bias=False)
    net = nn.Sequential(convt)
    x = torch.zeros(1, 2, 3, 3)
    hw = _systolic("ws", 3, 2)
    g = analyse(net, x)
    ly = g.layers[0]
    assert (ly.M, ly.K, ly.N) == (18, 2, 9)
    from flipguard.ra.systolic import _Schedule

    parts = _Schedule(ly, hw.cfg, 32, 32).output_terms((18, 9), 0)
    acc = sum(t.values(np.arange(162)) for t in parts["pe"] + parts["ob"]).reshape(18, 9)
    after = sum(t.values(np.arange(162)) for t in parts["after"]).reshape(18, 9)
    oh, ow = ly.out_shape[1:]
    want, after_sum, n = np.zeros(ly.out_shape), np.zeros(ly.out_shape), np.zeros(ly.out_shape)
    for co in range(2):
        for ki in range(3):
            for kj in range(3):
                for a in range(3):
                    for b in range(3):
                        i, j = a * 2 - 1 + ki, b * 2 - 1 + kj
                        if 0 <= i < oh and 0 <= j < ow:
                            col = (co * 9 + ki * 3 + kj, a * 3 + b)
                            want[co, i, j] += acc[col]  # every partial word is exposed
                            after_sum[co, i, j] += after[col]
                            n[co, i, j] += 1
    want += after_sum / n  # the stored output: from the mean drain of its parts
    got = _cycles(net, x, hw, "activation", "0") - math.ceil(np.prod(ly.out_shape) / 2)
    assert np.allclose(got, want)


def test_groups_run_one_after_another():
    # two groups of a 1x1 conv are two identical GEMMs; group 0 finishes Tg cycles earlier,
    # so its outputs wait Tg cycles longer in the output buffer; weights differ not at all
    net, x = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2, bias=False)), torch.zeros(1, 4, 3, 3)
    hw = _systolic("ws", 2, 2)
    g = analyse(net, x)
    assert (g.layers[0].M, g.layers[0].K, g.layers[0].N, g.layers[0].groups) == (2, 2, 9, 2)
    tg = 2 * 2 + 9 + 2 - 2  # one tile per group
    out = _cycles(net, x, hw, "activation", "0")
    assert np.allclose(out[:2], out[2:] + tg)
    w = _cycles(net, x, hw, "weight", "0")
    assert np.array_equal(w[:2], w[2:])


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(2, 2, bias=False) for _ in range(3))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc3(self.fc2(h) + h)


class _Untraceable(nn.Sequential):
    def forward(self, x):
        for m in self:
            x = m(x) if x.sum() > -1e9 else x
        return x


def test_residual_add_ends_the_operands_life():
    net, x = _Residual(), torch.zeros(1, 2)
    uses = [[(u.consumer, u.reads) for u in ly.uses] for ly in analyse(net, x).layers]
    assert uses == [[(1, False), (1, True)], [(1, False)], [(3, True)]]
    hw = MemoryModel(macs_per_cycle=1, words_per_cycle=1)  # 4 cycles per layer, readout 2
    p = build_exposure(net, x, hw, targets=("activation",))
    assert _cycles(net, x, hw, "activation", "fc1").tolist() == [4.0, 4.0]  # until fc2 ends
    assert p.block("activation", "fc2") is None  # consumed by the fused add at once
    assert _cycles(net, x, hw, "activation", "fc3").tolist() == [2.0, 2.0]


class _FlipScale(nn.Module):
    """A parametrised user module that reverses its input: not a layer boundary for RA."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flip(-1) * self.w


def test_analysis_looks_inside_parametrised_user_modules():
    # the trace must see the flip inside _FlipScale: layer 0's output reaches layer 2 in
    # another layout (a tracer stopping at every module with parameters would call it exact)
    net = nn.Sequential(nn.Linear(4, 3), _FlipScale(), nn.Linear(3, 2))
    g = analyse(net, torch.zeros(1, 4))
    assert g.method == "fx" and [ly.name for ly in g.layers] == ["0", "2"]
    assert [(u.consumer, u.exact) for u in g.layers[0].uses] == [(1, False)]
    plain = analyse(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), torch.zeros(1, 4))
    assert [(u.consumer, u.exact) for u in plain.layers[0].uses] == [(1, True)]


def test_untraceable_model_falls_back_to_call_order():
    net = _Untraceable(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    g = analyse(net, torch.zeros(1, 3))
    assert g.method == "hooks" and [ly.name for ly in g.layers] == ["0", "2"]
    assert [(u.consumer, u.exact) for u in g.layers[0].uses] == [(1, True)]
    ref = _mlp(3, 2, 2)
    for hw in ("memory", "systolic"):
        assert _cycles(net, torch.zeros(1, 3), hw, "activation", "0").tolist() == \
            _cycles(ref, torch.zeros(1, 3), hw, "activation", "0").tolist()
