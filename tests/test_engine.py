"""Engine exactness: batched, incremental (run-from-layer) and naive in-place full-forward
evaluation give bit-identical outputs on the sequential CAE, an fx-traced ResNet-20 with skip
connections and a non-traceable model; outcomes vs independent references; formats,
disk cache, early exits and early decisions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn

from flipguard.detect import ScoreConfig, Scorer
from flipguard.errors import FlipguardError
from flipguard.faults import Fault
from flipguard.inject import (
    ClassificationTask,
    DetectionTask,
    Engine,
    as_arrow,
    evaluate_faults,
    inject,
    parse_criterion,
)
from flipguard.inject.graph import pad_rows
from flipguard.models import CAEConfig, build_cae
from models_zoo import Gated, InPlaceNet, Specialised, resnet20, smooth_images, tiny_cae

BS = 8
SCORER = Scorer(ScoreConfig(map="ssim", smooth_sigma=1.0))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _naive(model: nn.Module, x: torch.Tensor, fault: Fault | None, fmt: object = "fp32"
           ) -> torch.Tensor:
    """Reference: fault injected in place, full forward per chunk of BS rows (padded)."""
    outs = []
    with torch.no_grad():
        ctx = inject(model, fault, fmt) if fault is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            for a in range(0, x.shape[0], BS):
                r = min(BS, x.shape[0] - a)
                outs.append(model(pad_rows(x[a : a + r], BS))[:r])
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return torch.cat(outs)


def _act_shapes(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}

    def hook(name: str):
        def h(m: nn.Module, i: object, o: torch.Tensor) -> None:
            sizes[name] = o[0].numel()
        return h

    hs = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return sizes


def _faults(model: nn.Module, x: torch.Tensor, seed: int, per_layer: int = 2) -> list[Fault]:
    rng = np.random.default_rng(seed)
    layers = [n for n, m in model.named_modules() if next(m.parameters(False), None) is not None]
    acts = _act_shapes(model, x, layers)
    bits = [0, 3, 12, 22, 23, 26, 29, 30, 31]
    out = []
    for n in layers:
        m = model.get_submodule(n)
        for target in ("weight", "bias", "activation"):
            numel = acts.get(n, 0) if target == "activation" else (
                getattr(m, target).numel() if getattr(m, target, None) is not None else 0)
            for _ in range(per_layer if numel else 0):
                kind = ["flip", "flip", "stuck-at-1"][int(rng.integers(3))]
                out.append(Fault(target, n, int(rng.integers(numel)),
                                 (int(rng.choice(bits)),), kind))
    out.append(Fault("weight", layers[0], 0, (29, 30), "flip"))  # a multi-bit upset
    return out


def _detection(model: nn.Module, x: torch.Tensor) -> DetectionTask:
    with torch.no_grad():
        s = SCORER.scores(x, _naive(model, x, None))
    labels = (np.arange(x.shape[0]) % 3 == 0).astype(int)
    return DetectionTask(SCORER.scores, float(s.quantile(0.6)), labels)


def _check_three_ways(model, x, task, faults, expect_strategy):
    eng = Engine(model, x, task, batch_size=BS, fault_batch=8, channel_blocks="always")
    inc = Engine(model, x, task, batch_size=BS, fault_batch=1, channel_blocks="never")
    full = Engine(model, x, task, batch_size=BS, strategy="full")
    assert eng.strategy_used == expect_strategy and full.strategy_used == "full-forward"
    outs_b, outs_i = eng.faulty_outputs(faults), inc.faulty_outputs(faults)
    for f, ob, oi in zip(faults, outs_b, outs_i, strict=True):
        ref = _naive(model, x, f)
        assert _same(ob, ref), f
        assert _same(oi, ref), f
    runs = [e.run(faults) for e in (eng, inc, full)]
    assert [o.to_dict() for o in runs[0]] == [o.to_dict() for o in runs[1]]
    assert [o.to_dict() for o in runs[0]] == [o.to_dict() for o in runs[2]]
    return eng, runs[0]


def test_cae_batched_incremental_naive_bit_identical():
    model, x = tiny_cae(), smooth_images(12, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    faults = _faults(model, x, seed=0)
    eng, outs = _check_three_ways(model, x, _detection(model, x), faults, "graph")
    assert any(eng._block.values())  # the output-channel block path was exercised
    assert any(o.masked for o in outs) and any(not o.masked for o in outs)
    assert any(o.nonfinite for o in outs)
    for k, v in model.state_dict().items():  # the user's model is bit-identical afterwards
        assert _same(v, before[k])


def test_memory_cae_bit_identical():
    # A MemAE memory (softmax addressing, matmuls) between encoder and decoder: the graph
    # engine still gives the naive forward's bits, memory items included as fault sites.
    model = build_cae(CAEConfig(input_size=32, width=0.25, latent_dim=8, bottleneck="spatial",
                                memory=6, seed=1)).eval()
    x = smooth_images(12, 32)
    faults = _faults(model, x, seed=2, per_layer=1)
    faults += [Fault("weight", "memory", i, (b,)) for i, b in ((0, 30), (17, 22), (47, 3))]
    assert {f.layer for f in faults} >= {"encoder.0", "memory", "decoder.0"}
    task = _detection(model, x)
    _, outs = _check_three_ways(model, x, task, faults, "graph")
    # Certification skips what it cannot bound (the memory's softmax) and stays sound.
    cert = Engine(model, x, task, batch_size=BS, certify=True).run(faults)
    assert all(a.same_decisions(b) for a, b in zip(cert, outs, strict=True))


def test_resnet20_skip_connections_bit_identical():
    model, x = resnet20(width=4), smooth_images(12, 16, channels=3)
    task = ClassificationTask(np.arange(12) % 10)
    faults = _faults(model, x, seed=1, per_layer=1)
    assert any(f.layer.endswith("bn1") for f in faults) and any(f.layer == "fc" for f in faults)
    eng, outs = _check_three_ways(model, x, task, faults, "graph")
    assert eng.program is not None  # rows were dropped at cuts after the faulty layer
    assert any(st[1] for stop, st in eng._stop_stats.items() if stop != eng.program.end)
    golden = eng.golden
    assert golden.accuracy == accuracy_score(task.labels, _naive(model, x, None).argmax(1))
    for f, o in zip(faults, outs, strict=True):
        ref_pred = _naive(model, x, f).argmax(1).numpy()
        if not o.masked:
            assert o.mismatches == int((ref_pred != golden.facts).sum())
            assert o.accuracy == accuracy_score(task.labels, ref_pred)


def test_non_traceable_model_falls_back_to_full_forward():
    model, x = Gated(), smooth_images(12, 8)
    faults = [Fault("weight", "conv", 3, (30,)), Fault("bias", "up", 1, (22,)),
              Fault("weight", "down", 10, (26,)), Fault("activation", "conv", 20, (30,)),
              Fault("weight", "head", 2, (31,))]
    eng, _ = _check_three_ways(model, x, ClassificationTask(np.arange(12) % 3), faults,
                               "full-forward")
    assert "not traceable by torch.fx" in (eng.fallback_reason or "")
    model, x = Specialised(), smooth_images(12, 8)
    eng, _ = _check_three_ways(model, x, ClassificationTask(np.arange(12) % 2),
                               [Fault("weight", "conv", 4, (30,)), Fault("bias", "fc", 1, (29,))],
                               "full-forward")
    assert "differs from forward()" in (eng.fallback_reason or "")


def test_in_place_ops_do_not_corrupt_the_cache():
    model, x = InPlaceNet(), smooth_images(12, 8)
    faults = [Fault("weight", "conv2", 5, (30,)), Fault("bias", "conv3", 1, (22,)),
              Fault("activation", "conv2", 17, (29,)), Fault("weight", "conv1", 2, (26,))]
    task = ClassificationTask(np.arange(12) % 2)
    eng = Engine(model, x, task, batch_size=BS)
    assert eng.strategy_used == "graph" and eng.program.mutated
    first = eng.faulty_outputs(faults)
    again = eng.faulty_outputs(faults[::-1])[::-1]
    for f, a, b in zip(faults, first, again, strict=True):
        ref = _naive(model, x, f)
        assert _same(a, ref) and _same(b, ref), f


def test_outcomes_match_independent_reference():
    model, x = tiny_cae(), smooth_images(12, 32)
    task = _detection(model, x)
    eng = Engine(model, x, task, batch_size=BS)
    gold = _naive(model, x, None)
    g_scores = SCORER.scores(x, gold).double().numpy()
    assert np.array_equal(eng.golden.facts, g_scores)
    assert eng.golden.auroc == pytest.approx(roc_auc_score(task.labels, g_scores), abs=1e-12)
    faults = [Fault("weight", "encoder.2", 17, (26,)), Fault("bias", "decoder.6", 1, (23,)),
              Fault("activation", "encoder.4", 40, (29,)), Fault("weight", "decoder.0", 5, (1,))]
    for f, o in zip(faults, eng.run(faults), strict=True):
        y = _naive(model, x, f)
        changed = (y.view(torch.int32) != gold.view(torch.int32)).reshape(12, -1).any(1)
        s = SCORER.scores(x, y).double().numpy()
        pred, gpred = s > task.threshold, g_scores > task.threshold
        assert o.n_changed == int(changed.sum()) and o.n_images == 12
        assert o.masked == (not changed.any())
        assert o.flips_to_anomalous == int((pred & ~gpred).sum())
        assert o.flips_to_normal == int((~pred & gpred).sum())
        assert o.accuracy == accuracy_score(task.labels, pred)
        assert o.auroc == pytest.approx(roc_auc_score(task.labels, s), abs=1e-12)
        assert o.max_abs_dscore == pytest.approx(np.abs(s - g_scores).max(), abs=0)


def test_early_exits_noop_and_nonfinite():
    model, x = tiny_cae(), smooth_images(8, 32)
    eng = Engine(model, x, _detection(model, x), batch_size=BS)
    w = model.encoder[0].weight.detach().reshape(-1)
    sign_set = int(torch.nonzero(w < 0)[0])
    outs = eng.run([Fault("weight", "encoder.0", sign_set, (31,), "stuck-at-1"),
                    Fault("weight", "encoder.0", 0, tuple(range(23, 31)), "stuck-at-1")])
    assert outs[0].noop and outs[0].masked and outs[0].n_images == 0
    crit = parse_criterion(None)
    assert crit.classify(outs[0], eng.golden) == "masked"
    assert outs[1].nonfinite_outputs and crit.classify(outs[1], eng.golden) == "non-finite"


def test_disk_cache_gives_identical_results(tmp_path):
    model, x = resnet20(width=4), smooth_images(12, 16, channels=3)
    task = ClassificationTask(np.arange(12) % 10)
    faults = _faults(model, x, seed=2, per_layer=1)[::3]
    mem = Engine(model, x, task, batch_size=BS)
    disk = Engine(model, x, task, batch_size=BS, cache_budget_bytes=0, cache_dir=tmp_path)
    disk.prepare()  # the golden pass is an explicit (or first-use) step
    assert disk.cache.mem_bytes > 0 and disk.cache.disk_bytes > 0 and disk.stops == []
    files = list(tmp_path.glob("*.npy"))
    assert files
    for a, b in zip(mem.faulty_outputs(faults), disk.faulty_outputs(faults), strict=True):
        assert _same(a, b)
    assert [o.to_dict() for o in mem.run(faults)] == [o.to_dict() for o in disk.run(faults)]
    disk.cache.drop()
    assert not any(f.exists() for f in files)


def _quantised_copy(model: nn.Module, fmt: str) -> nn.Module:
    """Independent quantisation of every Conv/ConvT weight and bias."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if not isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                continue
            for t, ax in ((m.weight, 1 if isinstance(m, nn.ConvTranspose2d) else 0),
                          (m.bias, 0)):
                if fmt == "fp16":
                    t.copy_(t.half().float())
                else:  # int8-channel: one scale per output channel (kernel)
                    dims = [d for d in range(t.dim()) if d != ax]
                    amax = t.abs().amax(dim=dims, keepdim=True) if dims else t.abs()
                    s = torch.clamp_min(amax / 127.0, torch.finfo(torch.float32).eps)
                    t.copy_(torch.round(t / s).clamp(-127, 127) * s)
    return ref


@pytest.mark.parametrize("fmt", ["fp16", "int8-channel"])
def test_formats_quantise_a_working_copy(fmt):
    model, x = tiny_cae(), smooth_images(8, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = _detection(model, x)
    eng = Engine(model, x, task, fmt=fmt, batch_size=BS)
    ref = _quantised_copy(model, fmt)
    assert _same(eng.golden_outputs, _naive(ref, x, None))
    for k, v in model.state_dict().items():
        assert _same(v, before[k])
    if fmt == "fp16":
        faults = [Fault("weight", "encoder.4", 11, (14,)), Fault("bias", "decoder.2", 0, (10,)),
                  Fault("activation", "decoder.4", 7, (13,))]
        for f, out in zip(faults, eng.faulty_outputs(faults), strict=True):
            assert _same(out, _naive(ref, x, f, "fp16"))
    else:  # flip bit 7 (sign) of the int8 word: value -> (q ^ 0x80) * scale
        f = Fault("weight", "decoder.4", 21, (7,))
        t = ref.decoder[4].weight
        pos = np.unravel_index(21, tuple(t.shape))
        s = t.detach().abs().amax(dim=(0, 2, 3))[pos[1]] / 127.0
        q = np.array([int(torch.round(t.detach()[pos] / s))], np.int8)
        faulty = float((q.view(np.uint8) ^ np.uint8(0x80)).view(np.int8)[0]) * s
        with torch.no_grad():
            old = t[pos].clone()
            t[pos] = faulty
            expect = _naive(ref, x, None)
            t[pos] = old
        assert _same(eng.faulty_outputs([f])[0], expect)


def test_early_decision_gives_same_class():
    model, x = tiny_cae(), smooth_images(24, 32)
    task = _detection(model, x)
    crit = "accuracy-drop:0.05"
    faults = [Fault("weight", "encoder.0", 3, (30,)), Fault("weight", "decoder.2", 40, (30,)),
              Fault("bias", "decoder.14", 2, (30,)), Fault("weight", "encoder.8", 9, (3,)),
              Fault("weight", "decoder.16", 5, (29,)), Fault("activation", "encoder.2", 9, (29,)),
              Fault("weight", "encoder.16", 100, (28,)), Fault("bias", "decoder.16", 0, (26,))]
    full = Engine(model, x, task, batch_size=4).run(faults)
    early = Engine(model, x, task, batch_size=4, early_stop=crit).run(faults)
    c = parse_criterion(crit)
    golden = Engine(model, x, task, batch_size=4).golden
    assert [c.classify(o, golden) for o in early] == [c.classify(o, golden) for o in full]
    stopped = [o for o in early if o.early_stopped]
    assert stopped and all(o.n_images < 24 for o in stopped)
    assert all(not o.early_stopped and o.n_images == 24 for o in full)
    same = Engine(model, x, task, batch_size=4, image_order="margin").run(faults)
    assert [o.to_dict() for o in same] == [o.to_dict() for o in full]  # order changes nothing
    mild = Fault("weight", "decoder.16", 5, (29,))  # flips 3 borderline images
    kw = {"batch_size": 4, "early_stop": "any-flip"}
    by_index = Engine(model, x, task, **kw).run([mild])[0]
    ordered = Engine(model, x, task, **kw, image_order="margin")
    by_margin = ordered.run([mild])[0]
    assert by_margin.flips > 0 and by_margin.n_images < by_index.n_images
    margins = np.abs(golden.facts - task.threshold)
    assert np.all(np.diff(margins[ordered._order]) >= 0)


def test_notebook_api_records_and_arrow():
    model, x = resnet20(width=4), smooth_images(8, 16, channels=3)
    faults = [Fault("weight", "fc", 3, (30,)), Fault("weight", "conv1", 1, (2,), "stuck-at-0")]
    recs = evaluate_faults(model, x, ClassificationTask(np.arange(8) % 10), faults,
                           batch_size=BS)
    assert [r["layer"] for r in recs] == ["fc", "conv1"] and recs[0]["bits"] == "30"
    table = as_arrow(recs)
    assert table.num_rows == 2 and {"mismatches", "masked", "kind"} <= set(table.column_names)


def test_engine_errors_are_one_line():
    model, x = tiny_cae(), smooth_images(4, 32)
    task = DetectionTask(SCORER.scores, 0.5, [0, 1, 0, 1])
    with pytest.raises(FlipguardError, match="labels: expected one label per input"):
        Engine(model, x, DetectionTask(SCORER.scores, 0.5, [0, 1]))
    with pytest.raises(FlipguardError, match="batch_size"):
        Engine(model, x, task, batch_size=0)
    with pytest.raises(FlipguardError, match="format"):
        Engine(model, x, task, fmt="fp8")
    eng = Engine(model, x, task, batch_size=4)
    for bad in (Fault("weight", "encoder.99", 0, (1,)), Fault("weight", "encoder.0", 10**6, (1,))):
        with pytest.raises(FlipguardError) as exc:
            eng.run([bad])
        assert "\n" not in str(exc.value)
