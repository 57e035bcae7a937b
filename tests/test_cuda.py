"""The engine on CUDA: bit-identical to naive in-place injection on the same device, and
certified outcomes keep every decision. Runs where a CUDA device exists, skips elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from flipguard.inject import Engine
from models_zoo import smooth_images, tiny_cae
from test_engine import BS, _detection, _faults, _naive, _same

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _deterministic():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


def test_engine_on_cuda_is_bit_identical_to_naive_on_cuda():
    model, x = tiny_cae(), smooth_images(12, 32)
    faults = _faults(model, x, seed=0)
    gpu = copy.deepcopy(model).cuda().eval()
    task = _detection(model, x)
    eng = Engine(model, x, task, batch_size=BS, device="cuda")
    assert eng.strategy_used == "graph"
    for f, out in zip(faults, eng.faulty_outputs(faults), strict=True):
        assert _same(out, _naive(gpu, x.cuda(), f).cpu()), f
    full = Engine(model, x, task, batch_size=BS, device="cuda", strategy="full")
    assert [o.to_dict() for o in eng.run(faults)] == [o.to_dict() for o in full.run(faults)]


def test_certified_outcomes_on_cuda_keep_every_decision():
    from test_certify import _case
    from test_certify import _faults as cert_faults

    net, x, task = _case("cnn")
    faults = cert_faults(net, "fp32", 600)
    fast = Engine(net, x, task, device="cuda", certify=True, batch_size=16)
    sim = Engine(net, x, task, device="cuda", batch_size=16)
    got, ref = fast.run(faults), sim.run(faults)
    assert sum(o.n_certified for o in got) > 0
    assert all(a.same_decisions(b) for a, b in zip(got, ref, strict=True))
