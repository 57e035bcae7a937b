"""Cross-check with PyTorchFI 0.6.0: the same weight and activation bit flips injected by
PyTorchFI give bit-identical faulty outputs to flipguard's engine (CAE with Conv2d and
ConvTranspose2d layers, where ConvTranspose weights are stored (in, out, kh, kw))."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.faults import Fault
from flipguard.inject import DetectionTask, Engine
from models_zoo import smooth_images, tiny_cae

fault_injection = pytest.importorskip("pytorchfi.core").fault_injection

TYPES = [nn.Conv2d, nn.ConvTranspose2d]
N = 8


def _flip(value: float, bit: int) -> float:
    (w,) = struct.unpack("<I", struct.pack("<f", value))
    return struct.unpack("<f", struct.pack("<I", w ^ (1 << bit)))[0]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PyTorchFI's layer numbering: model.modules() order, injectable types only."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(TYPES))]


@pytest.fixture(autouse=True)
def _quiet_pytorchfi():
    """PyTorchFI logs every injection at INFO; silence it for these tests only."""
    logging.disable(logging.INFO)
    yield
    logging.disable(logging.NOTSET)


def _setup():
    model, x = tiny_cae(), smooth_images(N, 32)
    task = DetectionTask(lambda a, b: (a - b).flatten(1).abs().amax(1), 0.5,
                         np.arange(N) % 2)
    pfi = fault_injection(model, N, input_shape=[1, 32, 32],
                                         layer_types=TYPES, use_cuda=False)
    return model, x, Engine(model, x, task, batch_size=N), pfi


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_weight_faults_match_pytorchfi():
    model, x, eng, pfi = _setup()
    rng = np.random.default_rng(0)
    layers = _layers(model)
    faults, coords = [], []
    for num, (name, m) in enumerate(layers):
        for bit in (int(rng.integers(0, 23)), int(rng.integers(23, 31)), 31):
            idx = int(rng.integers(m.weight.numel()))
            faults.append(Fault("weight", name, idx, (bit,)))
            coords.append((num, np.unravel_index(idx, tuple(m.weight.shape))))
    assert any(isinstance(m, nn.ConvTranspose2d) for _, m in layers)
    outs = eng.faulty_outputs(faults)
    for f, (num, c), ours in zip(faults, coords, outs, strict=True):
        bit = f.bits[0]
        corrupt = pfi.declare_weight_fi(
            function=lambda w, idx, bit=bit: _flip(float(w[idx]), bit), layer_num=[num],
            k=[int(c[0])], dim1=[int(c[1])], dim2=[int(c[2])], dim3=[int(c[3])])
        with torch.no_grad():
            theirs = corrupt(x)
        assert _same(ours, theirs), f
    assert any(not _same(o, eng.golden_outputs) for o in outs)


def test_activation_faults_match_pytorchfi():
    model, x, eng, pfi = _setup()
    rng = np.random.default_rng(1)
    layers = _layers(model)
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: acts.__setitem__(n, o.clone()))
             for n, m in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for num in rng.choice(len(layers), size=6, replace=False):
        name = layers[num][0]
        golden = acts[name]
        idx = int(rng.integers(golden[0].numel()))
        bit = int(rng.choice([5, 22, 27, 30, 31]))
        c, h, w = (int(v) for v in np.unravel_index(idx, tuple(golden.shape[1:])))
        values = [_flip(float(golden[b, c, h, w]), bit) for b in range(N)]
        corrupt = pfi.declare_neuron_fi(batch=list(range(N)), layer_num=[int(num)] * N,
                                        dim1=[c] * N, dim2=[h] * N, dim3=[w] * N,
                                        value=values)
        pfi.reset_current_layer()  # PyTorchFI counts hooked layers across forwards
        with torch.no_grad():
            theirs = corrupt(x)
        (ours,) = eng.faulty_outputs([Fault("activation", name, idx, (bit,))])
        assert _same(ours, theirs), (name, idx, bit)
