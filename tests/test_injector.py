"""In-place injection: exact restore (hypothesis over sites and bits incl. inf/NaN-producing
exponent bits), struct/numpy oracles for the faulty values, stateless activation hooks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from flipguard.errors import FlipguardError
from flipguard.faults import Fault
from flipguard.inject import activation_fault, faulty_value, inject


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2),
                         nn.Flatten(), nn.Linear(2 * 8 * 8, 4)).eval()


NET = _net()
TENSORS = [(name, t) for name in ("0", "2", "4") for t in ("weight", "bias")]


def _bits_of(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in model.state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _oracle_fp32(value: float, bits: tuple[int, ...], kind: str) -> int:
    """Faulty word of a float32 value by struct (independent of torch bit ops)."""
    (w,) = struct.unpack("<I", struct.pack("<f", value))
    mask = sum(1 << b for b in bits)
    if kind == "flip":
        return w ^ mask
    return w | mask if kind == "stuck-at-1" else w & ~mask


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(TENSORS) - 1), frac=st.floats(0, 1, exclude_max=True),
       bits=st.lists(st.integers(0, 31), min_size=1, max_size=3, unique=True),
       exp_all=st.booleans(), kind=st.sampled_from(["flip", "stuck-at-0", "stuck-at-1"]))
def test_inject_restores_every_bit(which, frac, bits, exp_all, kind):
    layer, target = TENSORS[which]
    if exp_all:  # all exponent bits set -> inf or NaN
        bits, kind = list(range(23, 31)), "stuck-at-1"
    t = getattr(NET.get_submodule(layer), target)
    index = int(frac * t.numel())
    before = _bits_of(NET)
    old = float(t.detach().reshape(-1)[index])
    fault = Fault(target, layer, index, tuple(bits), kind)
    with inject(NET, fault):
        now = t.detach().reshape(-1).view(torch.int32)
        expect = _oracle_fp32(old, tuple(bits), kind)
        assert int(now[index]) & 0xFFFFFFFF == expect
        diff = (now != torch.from_numpy(np.frombuffer(
            before[f"{layer}.{target}"], dtype=np.int32).copy())).sum()
        assert int(diff) == (0 if expect == struct.unpack("<I", struct.pack("<f", old))[0]
                             else 1)
    assert _bits_of(NET) == before


def test_restore_after_exception_and_noop():
    before = _bits_of(NET)
    with pytest.raises(RuntimeError, match="boom"), \
            inject(NET, Fault("weight", "0", 5, (30,))):
        raise RuntimeError("boom")
    assert _bits_of(NET) == before
    w = NET[0].weight.detach().reshape(-1)[5]
    sign = 1 if float(w) < 0 else 0
    f = Fault("weight", "0", 5, (31,), "stuck-at-1" if sign else "stuck-at-0")
    old, new, noop = faulty_value(NET, f)
    assert noop and old.view(torch.int32) == new.view(torch.int32)


def test_formats_fp16_and_int8_match_oracles():
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.copy_(net.weight.half().float())  # fp16-representable weights
    f = Fault("weight", "", 7, (14,))
    _, new, _ = faulty_value(net, f, "fp16")
    h = np.array([net.weight.detach().reshape(-1)[7].item()], dtype=np.float16)
    expect = (h.view(np.uint16) ^ np.uint16(1 << 14)).view(np.float16).astype(np.float32)
    assert new.item() == expect[0]
    # int8 per kernel (row): q = round(w / s), s = max|row| / 127; flip the sign bit of q
    w = net.weight.detach()
    s = w.abs().amax(dim=1) / 127
    q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    with torch.no_grad():
        net.weight.copy_(q.float() * s[:, None])
    _, new, _ = faulty_value(net, Fault("weight", "", 5, (7,)), "int8-channel")
    q5 = int(q.reshape(-1)[5])
    flipped = np.array([q5], dtype=np.int8).view(np.uint8) ^ np.uint8(0x80)
    assert new.item() == pytest.approx(float(flipped.view(np.int8)[0]) * s[1].item(), rel=1e-6)


def test_activation_hook_is_stateless_and_hits_every_sample():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh()).eval()
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        gold = net[0](x)
        ref = torch.tanh(gold)
    idx, bit = 13, 30
    fault = Fault("activation", "0", idx, (bit,))
    expect = gold.clone()
    for i in range(5):  # struct oracle, element by element
        v = float(gold[i].reshape(-1)[idx])
        word = _oracle_fp32(v, (bit,), "flip")
        expect[i].view(-1)[idx] = struct.unpack("<f", struct.pack("<I", word))[0]
    with torch.no_grad(), inject(net, fault):
        out1 = net(x)
        out2 = net(x)  # every forward, no counters
        out3 = net(x[2:4])  # any batch size
    expect = torch.tanh(expect)
    assert expect.isnan().any()  # bit 30 of values >= 1 gives NaN: compared bitwise
    assert _same(out1, expect) and _same(out2, expect)
    assert _same(out3, expect[2:4])
    with torch.no_grad():
        assert torch.equal(net(x), ref)  # hook removed
    changed = (out1.view(torch.int32) != ref.view(torch.int32)).reshape(5, -1).sum(1)
    assert changed.tolist() == [1] * 5


def test_activation_stuck_at_keeps_equal_bits():
    out = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    f = Fault("activation", "x", 1, (31,), "stuck-at-1")  # sign bit already 1 in row 0
    res = activation_fault(out, f)
    assert res[:, 1].tolist() == [-2.0, -4.0]
    assert res[:, 0].tolist() == [1.0, 3.0]
    f16 = Fault("activation", "x", 0, (0,), "stuck-at-0")  # 1.0 has mantissa LSB 0 in fp16
    assert activation_fault(out, f16, "fp16")[:, 0].tolist() == [1.0, 3.0]


@pytest.mark.parametrize(("fault", "match"), [
    (Fault("weight", "nope", 0, (1,)), "layer: unknown module 'nope'"),
    (Fault("bias", "1", 0, (1,)), "target: module '1' .* has no bias"),
    (Fault("weight", "0", 10_000, (1,)), "index: expected 0..53"),
    (Fault("weight", "0", 0, (40,)), "bits: expected 0..31"),
])
def test_errors_are_one_line(fault, match):
    with pytest.raises(FlipguardError, match=match) as exc, inject(NET, fault):
        pass
    assert "\n" not in str(exc.value)


def test_activation_index_out_of_range():
    with pytest.raises(FlipguardError, match="index: expected 0..3"):
        activation_fault(torch.zeros(2, 4), Fault("activation", "x", 4, (1,)))
