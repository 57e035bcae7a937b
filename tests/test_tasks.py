"""Tasks beyond detection/classification, open criteria, and refusing non-finite golden
models: checked against brute-force in-place injection (struct-level bit flips)."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.errors import ConfigError
from flipguard.faults import Fault
from flipguard.inject import (
    ClassificationTask,
    Criterion,
    Engine,
    Golden,
    Outcome,
    ToleranceTask,
    parse_criterion,
    register_criterion,
)
from models_zoo import smooth_images, tiny_cae


def _flip(v: float, bit: int) -> float:
    (w,) = struct.unpack("<I", struct.pack("<f", v))
    return struct.unpack("<f", struct.pack("<I", w ^ (1 << bit)))[0]


def _brute_tolerance(model, x, fault, atol, rtol):
    """Faulty outputs by patching one float with struct, then the tolerance verdicts."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        golden = m(x)
        w = getattr(m.get_submodule(fault.layer), fault.target).view(-1)
        w[fault.index] = _flip(float(w[fault.index]), fault.bits[0])
        y = m(x)
    err = (y - golden).abs().double().flatten(1)
    ok = (err <= atol + rtol * golden.abs().double().flatten(1)) & torch.isfinite(y.flatten(1))
    wrong = int((~ok.all(1)).sum())
    return wrong, (len(x) - wrong) / len(x)


@pytest.mark.parametrize("strategy", ["auto", "full"])
def test_tolerance_task_matches_brute_force(strategy):
    model, x = tiny_cae(16, 0.25, 4), smooth_images(6, 16)
    atol, rtol = 1e-3, 1e-2
    rng = np.random.default_rng(0)
    faults = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            for bit in (30, 26, 22, 3):
                faults.append(Fault("weight", name, int(rng.integers(mod.weight.numel())),
                                    (bit,)))
    eng = Engine(model, x, ToleranceTask(len(x), atol=atol, rtol=rtol), batch_size=4,
                 strategy=strategy)
    outs = eng.run(faults)
    assert eng.golden.accuracy == 1.0 and eng.golden.kind == "tolerance"
    seen_wrong = 0
    for f, o in zip(faults, outs, strict=True):
        wrong, acc = _brute_tolerance(model, x, f, atol, rtol)
        if o.masked:
            assert wrong == 0
            continue
        assert o.mismatches == wrong and o.accuracy == pytest.approx(acc), f
        seen_wrong += wrong > 0
        crit = parse_criterion("accuracy-drop:0.1")
        assert crit.is_critical(o, eng.golden) == (o.nonfinite or 1.0 - acc > 0.1)
    assert seen_wrong > 0  # the check had faults that break the tolerance


def test_tolerance_task_rejects_bad_tolerances():
    with pytest.raises(ConfigError, match="atol"):
        ToleranceTask(3, atol=-1)
    with pytest.raises(ConfigError, match="rtol"):
        ToleranceTask(3, rtol=float("nan"))


def test_nonfinite_weights_or_golden_outputs_are_refused_naming_the_tensor():
    model, x = tiny_cae(16, 0.25, 4), smooth_images(4, 16)
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.get_submodule("encoder.0").weight.view(-1)[3] = float("nan")
    eng = Engine(bad, x, ToleranceTask(4))  # construction is cheap; the golden pass refuses
    with pytest.raises(ConfigError, match="'encoder.0.weight' holds 1 non-finite") as exc:
        eng.run([Fault("weight", "encoder.0", 0, (30,))])
    assert "\n" not in str(exc.value)

    class Log(nn.Module):
        def forward(self, t):
            return torch.log(t - 0.5).flatten(1)[:, :3]

    with pytest.raises(ConfigError, match="fault-free output is non-finite"):
        Engine(Log(), x, ClassificationTask([0, 1, 2, 0])).prepare()


def test_register_criterion_is_used_by_parse_and_classify():
    @register_criterion
    class HalfWrong(Criterion):
        name = "test-half-wrong"

        def _metric_critical(self, o, g):
            return o.accuracy is not None and o.accuracy < self.delta

    crit = parse_criterion("test-half-wrong:0.5")
    assert crit.text == "test-half-wrong:0.5"
    g = Golden(kind="classification", n_images=4, accuracy=1.0)
    assert crit.classify(Outcome(n_images=4, n_changed=2, accuracy=0.25), g) == "sdc-critical"
    assert crit.classify(Outcome(n_images=4, n_changed=1, accuracy=0.75), g) == "sdc-benign"
    with pytest.raises(ConfigError, match="test-half-wrong:δ"):
        parse_criterion("nope")
    with pytest.raises(ConfigError, match="Criterion subclass"):
        register_criterion(int)  # type: ignore[arg-type]
