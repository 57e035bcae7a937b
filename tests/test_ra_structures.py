"""Per-structure exposure rules of the systolic model (docs/exposure-models.md): capacities
are never exceeded, spilled data is charged at the DRAM rate, structure rates weight ``P``,
SEC-DED zeroes a protected structure, accumulator hits reach the output through
requantisation, and bad hardware files are one-line errors."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.errors import ConfigError
from flipguard.faults import get_format
from flipguard.ra import SystolicModel, analyse, build_exposure, load_systolic
from flipguard.ra.accumulator import MASKED, float_hit, int_hit, psum_map, requant_ratio
from flipguard.ra.hwconfig import DEFAULT_TOML, SystolicConfig

FP32 = get_format("fp32")


def _hw(**kw) -> SystolicModel:
    return SystolicModel(SystolicConfig(**kw))


def _per_structure(hw, net, x, target, layer, fmt=FP32):
    """Element bit-cycles of one tensor per structure: (word, acc) dicts of arrays."""
    se = hw.exposure(analyse(net, x), fmt)[(target, layer)]
    numel = math.prod(se.word[next(iter(se.word))][0].shape) if se.word else 0

    def arr(ts):
        idx = np.arange(numel)
        return sum((t.values(idx) for t in ts), np.zeros(numel))
    return ({s: arr(ts) for s, ts in se.word.items()}, {s: arr(ts) for s, ts in se.acc.items()})


# --------------------------------------------------------------------------- hand-checked
def test_hand_checked_structures_two_layer_mlp():
    # Linear(3,3) -> ReLU -> Linear(3,2), 2x2 WS array, N = 1: layer 1 takes 14 cycles,
    # layer 2 8, the host reads the 2 outputs in 1 cycle (23 in all; tests/test_ra_exposure)
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    x, hw = torch.zeros(1, 3), _hw(rows=2, cols=2)
    word, acc = _per_structure(hw, net, x, "weight", "0")
    assert word["pe"].tolist() == [1, 3, 1, 2, 4, 2, 1, 3, 1]  # N + 2r + c
    assert word["weight_buffer"].tolist() == [14] * 9  # fits: the whole layer
    assert word["dram"].tolist() == [23] * 9  # master copy, live all inference
    assert not acc
    word, acc = _per_structure(hw, net, x, "activation", "0")
    assert acc["pe"].tolist() == [3, 3, 3]  # a partial sum crosses K = 3 rows
    assert acc["output_buffer"].tolist() == [2 + 1, 2, 1]  # K-tile gap + drain in its tile
    # drained after its M-tile (6, 6, 0 cycles before layer 1 ends), then layer 2's 8
    assert word["activation_buffer"].tolist() == [6 + 8, 6 + 8, 8]
    assert word["dram"].tolist() == [0, 0, 0]  # everything fits
    assert word["pe"].tolist() == [2, 2, 2]  # streamed through layer 2's two columns


# --------------------------------------------------------------------------- capacities
def _spill_net(channels: int) -> tuple[nn.Module, torch.Tensor]:
    """conv 1 -> C on 128 x 128 (C = 32: a 2 MiB fp32 map, 64: 4 MiB), then a 1x1 conv."""
    net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.ReLU(),
                        nn.Conv2d(channels, 1, 1, bias=False))
    return net, torch.zeros(1, 1, 128, 128)


@pytest.mark.parametrize("channels", [32, 64])
def test_activation_buffer_never_exceeds_capacity(channels):
    net, x = _spill_net(channels)
    hw = _hw()  # 512 KiB activation buffer
    g = analyse(net, x)
    scheds, _, total, pl = hw.placement(g, FP32)
    cap = 512 * 1024 * 8
    size, out = channels * 128 * 128 * 32, 128 * 128 * 32
    assert size >= 4 * cap
    assert pl.occupancy.max() <= cap * (1 + 1e-12)
    # closed form: alone while its producer drains it (cap / size on chip), then shared
    # with the 64 KiB output of the reader, which fits whole (water-filling)
    assert pl.during[0] == pytest.approx(cap / size)
    assert pl.on_chip[0] == pytest.approx(scheds[1].T * (cap - out) / size)
    assert pl.dram[0] == pytest.approx(scheds[1].T * (1 - (cap - out) / size))
    word, _ = _per_structure(hw, net, x, "activation", "0")
    buf = word["activation_buffer"].sum() * 32
    assert buf <= cap * (scheds[0].T + scheds[1].T)
    # the old model charged every spilled element the reader's whole duration
    assert buf < 1.01 * cap * scheds[1].T + pl.during[0] * word["activation_buffer"].size * 32 \
        * scheds[0].T
    assert (word["activation_buffer"] + word["dram"]).min() >= scheds[1].T  # life conserved


@pytest.mark.parametrize("dataflow", ["ws", "os", "is"])
def test_every_structure_within_capacity_times_time(dataflow):
    """Small buffers (64 KiB weights/activations, 1 KiB accumulator) and a layer of 2 MiB
    weights: every buffer's bit-cycles <= capacity x time, PE registers <= R*C registers."""
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 8, 3, padding=1), nn.Flatten(), nn.Linear(8192, 64))
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    kib = {"weight_kib": 64.0, "activation_kib": 64.0, "output_kib": 1.0}
    hw = _hw(dataflow=dataflow, **kib)
    g = analyse(net, x)
    scheds, _, total, pl = hw.placement(g, FP32)
    cycles: dict[str, float] = {}
    for se in hw.exposure(g, FP32).values():
        for s, v in se.bit_cycles(32).items():
            cycles[s] = cycles.get(s, 0.0) + v
    for s in ("weight_buffer", "activation_buffer", "output_buffer"):
        assert 0 < cycles[s] <= hw.cfg.capacity_bits(s) * total, s
    assert cycles["pe"] <= 16 * 16 * (32 + 32 + 32) * total  # weight, input, partial sum
    assert pl.occupancy.max() <= hw.cfg.capacity_bits("activation_buffer") * (1 + 1e-12)
    for s in scheds:  # a block of partial sums always fits the accumulator buffer
        block = (s.mts.max() * s.nts.max() if s.df == "os" else s.pts.max() * s.sc) * 32
        assert block * s.f_ob <= 1024 * 8
    assert dataflow == "os" or max(s.nch for s in scheds) > 1


def test_spilled_activation_charged_at_dram_rate():
    net, x = _spill_net(32)
    ecc = build_exposure(net, x, _hw(), targets=("activation",))
    raw = build_exposure(net, x, _hw(protection={
        "weight_buffer": "none", "activation_buffer": "none", "output_buffer": "none",
        "dram": "none"}), targets=("activation",))
    word, acc = _per_structure(_hw(), net, x, "activation", "0")
    assert "dram" not in acc or acc["dram"].sum() == 0
    b_ecc, b_raw = ecc.block("activation", "0"), raw.block("activation", "0")
    dram_w = 1.0 / 1000.0  # dram 1 FIT/Mbit relative to the 1000 FIT/Mbit of SRAM / FFs
    assert b_raw.mass - b_ecc.mass == pytest.approx(32 * dram_w * word["dram"].sum())
    assert word["dram"].sum() > 0.7 * word["activation_buffer"].sum()  # mostly off chip
    assert ecc.info["structures"]["dram"]["share"] == 0.0


# --------------------------------------------------------------------------- rates
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.mark.parametrize("rates", [{"sram": 250.0, "flipflop": 1000.0, "dram": 50.0},
                                   {"sram": 1000.0, "flipflop": 20.0, "dram": 0.0}])
def test_structure_rates_weight_the_distribution(rates):
    net, x = _mlp(), torch.zeros(1, 4)
    prot = {"weight_buffer": "none", "activation_buffer": "none", "output_buffer": "none",
            "dram": "none"}
    hw = _hw(rows=2, cols=2, rates=rates, protection=prot)
    p = build_exposure(net, x, hw, targets=("weight", "bias", "activation"))
    sites, prob = p.enumerate()
    cell = {"pe": "flipflop", "weight_buffer": "sram", "activation_buffer": "sram",
            "output_buffer": "sram", "dram": "dram"}
    # raw bit-cycles do not depend on the rates: take them from a model with other rates
    exp = _hw(rows=2, cols=2).exposure(analyse(net, x), FP32)
    want = np.zeros(len(sites))
    for j, key in enumerate(sites.keys):
        sel = sites.block == j
        idx = sites.index[sel]
        for part in (exp[key].word, exp[key].acc):  # fp32: accumulator bit b -> output bit b
            for s, ts in part.items():
                want[sel] += rates[cell[s]] * sum(t.values(idx) for t in ts)
    assert np.allclose(prob, want / want.sum(), rtol=1e-10, atol=0)


def test_secded_zeroes_the_protected_structure():
    net, x = _mlp(), torch.zeros(1, 4)
    plain = build_exposure(net, x, _hw(rows=2, cols=2), targets=("weight", "activation"))
    prot = {"weight_buffer": "none", "activation_buffer": "secded", "output_buffer": "none",
            "dram": "secded"}
    hw = _hw(rows=2, cols=2, protection=prot)
    p = build_exposure(net, x, hw, targets=("weight", "activation"))
    assert p.info["structures"]["activation_buffer"]["share"] == 0.0
    word, acc = _per_structure(hw, net, x, "activation", "0")
    kept = sum(v for s, v in word.items() if s not in ("activation_buffer", "dram")) + sum(
        acc.values())
    b = p.block("activation", "0")
    assert np.allclose(b.element_weights(np.arange(3)), kept)
    assert plain.block("activation", "0").mass > b.mass
    raw = {s: v["bit_cycles"] for s, v in p.info["structures"].items()}
    ff_sram_dram = {"pe": 1.0, "dram": 1e-3}
    total = sum(v * ff_sram_dram.get(s, 1.0) for s, v in raw.items())
    assert p.info["corrected_share"] == pytest.approx(
        (raw["activation_buffer"] + 1e-3 * raw["dram"]) / total)
    every = dict.fromkeys(prot, "secded")
    with pytest.raises(ConfigError, match="rates"):
        SystolicConfig(protection=every, rates={"sram": 1.0, "flipflop": 0.0, "dram": 1.0})


# --------------------------------------------------------------------------- accumulators
def _f32_flip(v: float, bit: int) -> float:
    (w,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", w ^ (1 << bit)))[0]


def _bf16(v: np.ndarray) -> np.ndarray:
    w = v.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((w + 0x7FFF + ((w >> 16) & 1)) >> 16) << 16
    return (r & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _acc_values(n: int) -> np.ndarray:
    """fp32 accumulators in the fp16 normal range, random signs and mantissas."""
    rng = np.random.default_rng(5)
    return (rng.choice([-1.0, 1.0], n) * rng.uniform(1, 2, n) *
            2.0 ** rng.integers(-12, 12, n)).astype(np.float32)


@pytest.mark.parametrize("out", ["fp32", "fp16", "bf16"])
def test_float_accumulator_hit_matches_struct_oracle(out):
    acc = _acc_values(400)
    for bit in range(32):
        flipped = np.array([_f32_flip(float(v), bit) for v in acc], dtype=np.float32)
        with np.errstate(over="ignore"):
            want = {"fp32": flipped, "fp16": flipped.astype(np.float16).astype(np.float32),
                    "bf16": _bf16(flipped)}[out]
        got = float_hit(acc, bit, out)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)), bit


def _rounded(acc: np.ndarray, out: str) -> tuple[np.ndarray, np.ndarray]:
    """``acc`` rounded to ``out`` (numpy / integer RNE) and its 16-bit output word."""
    if out == "fp16":
        v = acc.astype(np.float16)
        return v.astype(np.float32), v.view(np.uint16)
    v = _bf16(acc)
    return v, (v.view(np.uint32) >> 16).astype(np.uint16)


def _word_value(w: np.ndarray, out: str) -> np.ndarray:
    if out == "fp16":
        return w.view(np.float16).astype(np.float32)
    return (w.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("out", ["fp16", "bf16"])
def test_float_psum_map_masks_low_bits_and_shifts_the_rest(out):
    """fp32 accumulator -> 16-bit output: every bit that psum_map masks leaves the rounded
    output unchanged; every other bit changes it like a flip of the output bit it maps to
    (the same magnitude; bit-for-bit unless a rounding carry intervenes)."""
    fmt, acc = get_format(out), _acc_values(2000)
    base, bw = _rounded(acc, out)
    m = psum_map(fmt, 32)
    for bit in range(32):
        got = float_hit(acc, bit, out)
        if m[bit, MASKED] == 1:
            assert np.mean(got == base) > 0.999, bit  # below the output's precision
            continue
        pred = _word_value(bw ^ np.uint16(1 << int(np.argmax(m[bit]))), out)
        if out == "fp16" and 27 <= bit <= 30:  # exponent out of fp16 range: inf or 0
            assert np.all(~np.isfinite(got) | (np.abs(got) < 2.0 ** -14)), bit
            continue
        same = np.mean((got == pred) | (np.isnan(got) & np.isnan(pred)))
        if bit >= 23:  # sign and exponent bits: the output bit itself (inside the range)
            tiny = 2.0 ** (-14 if out == "fp16" else -126)
            normal = np.isfinite(pred) & (np.abs(pred) >= tiny)
            assert np.mean(got[normal] == pred[normal]) > 0.99 and normal.mean() > 0.9, bit
        else:  # mantissa (and the rounding bit, one ulp up or down): the same step; a
            # rounding carry makes the bit pattern differ for the low ones
            step = np.isclose(np.abs(got - base), np.abs(pred - base), rtol=1e-6)
            assert np.mean(step) > 0.99 and same > 0.4, bit


def _int_oracle(acc: int, bit: int, ratio: float) -> int:
    u = (acc & 0xFFFFFFFF) ^ (1 << bit)
    a = u - (1 << 32) if u >= 1 << 31 else u
    return max(-128, min(127, round(a * ratio)))  # Python round: half to even


def test_int_accumulator_hit_matches_python_oracle():
    rng = np.random.default_rng(1)
    ratio = 1.37 * 2.0 ** -10
    acc = rng.integers(-int(130 / ratio), int(130 / ratio), 300)  # some already saturated
    for bit in range(32):
        got = int_hit(acc, bit, ratio)
        assert got.tolist() == [_int_oracle(int(a), bit, ratio) for a in acc], bit


def test_int_psum_map_masked_low_bits_and_saturating_high_bits():
    rng = np.random.default_rng(2)
    ratio = 1.37 * 2.0 ** -10
    acc = rng.integers(-int(120 / ratio), int(120 / ratio), 20000)
    base = np.clip(np.rint(acc * ratio), -128, 127)
    m = psum_map(get_format("int8"), 32, ratio)
    assert np.allclose(m.sum(axis=1), 1.0)
    for bit in range(32):
        got = int_hit(acc, bit, ratio)
        u = 2.0 ** bit * ratio
        if u < 1:  # moves by one step with probability u, else masked
            assert np.abs(got - base).max() <= 1
            changed = np.mean(got != base)
            assert abs(changed - u) <= 4 * math.sqrt(u * (1 - u) / acc.size) + 1e-9, bit
            assert m[bit, 0] == pytest.approx(u) and m[bit, MASKED] == pytest.approx(1 - u)
        elif u >= 256:  # saturating: a full-scale error, counted as the sign bit
            assert set(np.unique(got)) <= {-128, 127} and m[bit, 7] == 1, bit
        else:
            k = int(np.argmax(m[bit]))
            free = (np.abs(got) < 127) & (np.abs(base) < 127)
            assert np.all(np.abs(np.abs(got - base)[free] - u) <= 1), bit
            assert 2 ** -0.5 <= 2 ** k / u <= 2 ** 0.5 or k == 7, bit


def test_int8_distribution_uses_the_requantised_bit_map():
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(1, 6, generator=g)
    hw = _hw(rows=2, cols=2)
    fmt = get_format("int8")
    p = build_exposure(net, x, hw, targets=("weight", "activation"), fmt="int8")
    with torch.no_grad():
        h = net[0](x)
        ratio = float(net[0].weight.abs().max() * x.abs().max() / (127 * h.abs().max()))
    w_amax = float(net[0].weight.detach().abs().max())
    assert ratio == pytest.approx(requant_ratio(w_amax, float(x.abs().max()),
                                                float(h.abs().max()), 6))
    m = psum_map(fmt, 32, ratio)[:, :8].sum(axis=0)
    se = hw.exposure(analyse(net, x), fmt)[("activation", "0")]
    w = hw.structure_weights()
    word = sum(w[s] * sum(t.mass for t in ts) for s, ts in se.word.items())
    acc = sum(w[s] * sum(t.mass for t in ts) for s, ts in se.acc.items())
    assert np.allclose(p.block("activation", "0").bit_mass, word + m * acc)
    masked = acc * psum_map(fmt, 32, ratio)[:, MASKED].sum()
    assert masked > 0 and p.info["masked_share"] > 0


# --------------------------------------------------------------------------- TOML
@pytest.mark.parametrize("text, field", [
    ("[rates]\nsram = -1\n", "rates.sram"),
    ('[rates]\nflipflop = "high"\n', "rates.flipflop"),
    ('[protection]\ndram = "parity"\n', "protection.dram"),
    ('[protection]\npe = "secded"\n', "protection.pe"),
    ("[buffers]\noutput_kib = -4\n", "buffers.output_kib"),
    ("[accumulator_bits]\nfp16 = 24\n", "accumulator_bits.fp16"),
    ("[accumulator_bits]\nint8 = 4\n", "accumulator_bits.int8"),
    ("[rates]\nsram = 0\nflipflop = 0\ndram = 0\n", "rates"),
    ("[buffers]\nweight_kib = inf\n", "buffers.weight_kib"),
])
def test_bad_hardware_field_is_one_line_naming_file_and_field(tmp_path, text, field):
    f = tmp_path / "hw.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_systolic(f)
    msg = str(err.value)
    assert str(f) in msg and f"'{field}" in msg and "\n" not in msg


def test_missing_field_in_base_file_is_named(tmp_path):
    base = tmp_path / "base.toml"
    text = DEFAULT_TOML.read_text(encoding="utf-8").replace("dram = 1.0", "")
    base.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"base\.toml: missing field 'rates\.dram'"):
        load_systolic(None, base=base)
    assert load_systolic() == SystolicConfig()


def test_non_utf8_toml_is_one_line_without_traceback(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes("[array]\nrows = 4  # größe\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        load_systolic(f)
    assert "\n" not in str(err.value) and str(f) in str(err.value)
    from typer.testing import CliRunner

    from flipguard.cli import app

    res = CliRunner().invoke(app, ["ra", str(tmp_path / "run"), "--hardware", f"systolic:{f}"])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2  # an uncaught UnicodeDecodeError would exit 1 with a traceback
    assert len(lines) == 1 and "not UTF-8" in lines[0] and "Traceback" not in res.output
