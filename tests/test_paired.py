"""Paired re-injection: identical fault lists, effective faults == direct hardware simulation."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.campaign import CampaignStore, PlanConfig, make_plan
from flipguard.faults import Fault
from flipguard.harden.mechanisms import (
    Protection,
    ReadPath,
    constant_bits,
    to_signed,
    to_unsigned,
)
from flipguard.harden.module import harden_model, measure_input_bounds
from flipguard.harden.paired import (
    HardeningError,
    check_fault_free,
    deliver_faults,
    paired_bootstrap,
    paired_reinjection,
    stratified_cfr,
)
from flipguard.harden.planner import tensor_words
from flipguard.inject import ClassificationTask, Engine, parse_criterion

CRIT = "mismatch:0.0"


def tiny() -> tuple[nn.Module, torch.Tensor, ClassificationTask]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(12, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = net(x).argmax(1)
    return net, x, ClassificationTask(labels)


def make_store(tmp_path, net, x, task, error: float = 0.1) -> CampaignStore:
    plan = make_plan(net, PlanConfig(strata="layer", error=error, confidence=0.9, seed=3))
    store = CampaignStore.create(tmp_path / "campaign.sqlite", {"plan": plan.config.to_dict()},
                                 plan.strata, plan.faults())
    eng = Engine(net, x, task)
    store.set_meta("golden", eng.golden.to_dict())
    faults = store.planned()
    outs = eng.run([pf.fault for pf in faults])
    store.add_results([(pf.fault_id, o.to_dict()) for pf, o in zip(faults, outs, strict=True)])
    return store


class Recorder:
    """engine_for that records every fault it is asked to simulate."""

    def __init__(self, x: torch.Tensor, task: ClassificationTask) -> None:
        self.x, self.task, self.faults, self.models = x, task, [], []

    def __call__(self, model: nn.Module) -> Engine:
        eng = Engine(model, self.x, self.task)
        run = eng.run
        self.models.append(model)

        def recording(faults):
            self.faults.extend(faults)
            return run(faults)

        eng.run = recording  # type: ignore[method-assign]
        return eng


def invariant(net: nn.Module, layer: str) -> Protection:
    words, _, _ = tensor_words(net, layer, "weight")
    mask, vals = constant_bits(words)
    return Protection("invariant", layer, bits=tuple(b for b in range(32) if mask >> b & 1),
                      values=vals)


def test_same_faults_and_full_ecc_removes_single_bit_faults(tmp_path) -> None:
    net, x, task = tiny()
    store = make_store(tmp_path, net, x, task)
    rec = Recorder(x, task)
    prots = [Protection("ecc", n) for n in ("0", "2", "5")]
    res = paired_reinjection(store, net, prots, CRIT, rec)
    assert res.fault_ids == [pf.fault_id for pf in store.planned()]
    assert res.before.sum() > 0 and res.after.sum() == 0 and res.simulated == 0
    # every pair fixed: the weighted interval reaches 1 but, from a sample, cannot exclude
    # critical faults left in the unsampled words (the bootstrap said [1, 1])
    assert res.relative_improvement == 1.0 and res.ci[1] == 1.0 and 0.0 < res.ci[0] < 1.0
    assert res.comparison["p_sign_flip"] == pytest.approx(2 * 0.5 ** int(res.before.sum()))
    assert res.comparison["p_value"] < 0.05 and res.comparison["broken"] == 0
    assert res.statuses == {"corrected": len(res.fault_ids)}
    assert res.cfr_after["cfr"] == 0.0 and res.cfr_before["cfr"] > 0
    k = int(res.before.sum())  # all discordant pairs fixed: exact two-sided McNemar p
    assert k >= 5 and res.mcnemar_p == pytest.approx(2 * 0.5**k)
    assert rec.faults == []


def patched_outputs(net, x, fault: Fault, value: float) -> torch.Tensor:
    m = copy.deepcopy(net)
    t = getattr(m.get_submodule(fault.layer), fault.target)
    with torch.no_grad():
        t.view(-1)[fault.index] = value
        return m(x)


def f32(w: int) -> float:
    return struct.unpack("<f", struct.pack("<I", w & 0xFFFFFFFF))[0]


def test_effective_faults_equal_direct_hardware_simulation(tmp_path) -> None:
    net, x, task = tiny()
    store = make_store(tmp_path, net, x, task, error=0.3)
    prots = [Protection("parity", "0", bits=(30, 29, 28), policy="zero"),
             Protection("tmr", "2", bits=(30,)), invariant(net, "2"),
             Protection("range", "5", lo=float(net[5].weight.detach().min()),
                        hi=float(net[5].weight.detach().max()))]
    results = store.results()
    faults = [pf.fault for pf, _ in results]
    deliv = deliver_faults(net, faults, prots)
    paths = {p.layer: ReadPath.build([q for q in prots if q.layer == p.layer],
                                     net.get_submodule(p.layer).weight.numel())
             for p in prots}
    eng = Engine(net, x, task, batch_size=len(x))  # no padding: comparable to net(x)
    golden = net(x).detach()
    effective = [(f, d) for f, d in zip(faults, deliv, strict=True) if d.effective is not None]
    assert effective and any(d.status == "detected" for _, d in effective)
    outs = eng.faulty_outputs([d.effective for _, d in effective])
    for (f, d), out in zip(effective, outs, strict=True):
        g = to_unsigned(getattr(net.get_submodule(f.layer), f.target).detach()
                        .reshape(-1)[f.index].view(torch.int32).reshape(1), 32)
        w, _ = paths[f.layer].select([f.index]).deliver(g, torch.tensor([f.mask]), f.kind)
        direct = patched_outputs(net, x, f, f32(int(w)))
        assert torch.equal(out, direct)
        assert d.effective.kind == "flip" and d.effective.index == f.index
    for d in deliv:
        if d.effective is None:
            assert d.status in ("corrected", "no-error")
    # paired result is consistent with classifying the direct simulation
    rec = Recorder(x, task)
    res = paired_reinjection(store, net, prots, CRIT, rec)
    crit = parse_criterion(CRIT)
    eng2 = Engine(net, x, task)
    expect = []
    for d, b in zip(deliv, res.before, strict=True):
        if d.effective is None:
            expect.append(False)
        elif d.same:
            expect.append(bool(b))
        else:
            expect.append(crit.classify(eng2.run([d.effective])[0], eng2.golden)
                          in ("sdc-critical", "non-finite"))
    assert res.after.tolist() == expect
    assert all(e.index == f.index and e.layer == f.layer for e, f in
               zip(rec.faults, [f for f, d in zip(faults, deliv, strict=True)
                                if d.effective is not None and not d.same], strict=True))
    assert torch.equal(golden, net(x))  # the engine restored every weight


@pytest.mark.parametrize("fmt", ["fp16", "int8-channel"])
def test_effective_faults_other_formats(fmt: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(2))
    eng = Engine(net, x, ClassificationTask(net(x).argmax(1)), fmt=fmt, batch_size=10)
    words, _, bound = tensor_words(net, "0", "weight", fmt)
    vals = bound.decode(to_signed(words, bound.word_dtype, bound.bits).reshape(5, 6))
    prots = [Protection("parity", "0", bits=(bound.bits - 1, bound.bits - 2)),
             Protection("range", "0", lo=float(vals.min()), hi=float(vals.max()))]
    path = ReadPath.build(prots, 30, fmt=bound)
    faults = [Fault("weight", "0", i, (b,)) for i in (0, 11, 29) for b in range(bound.bits)]
    deliv = deliver_faults(net, faults, prots, fmt)
    eff = [(f, d) for f, d in zip(faults, deliv, strict=True) if d.effective is not None]
    assert {d.status for _, d in eff} == {"detected", "undetected"}
    for (f, _), out in zip(eff, eng.faulty_outputs([d.effective for _, d in eff]), strict=True):
        sel = bound.select([f.index])
        w, _ = path.select([f.index]).deliver(words[[f.index]], torch.tensor([f.mask]), "flip",
                                              sel)
        m = copy.deepcopy(eng.model)  # the engine's quantised golden model
        with torch.no_grad():
            m[0].weight.view(-1)[f.index] = sel.decode(to_signed(w, sel.word_dtype, sel.bits))[0]
            assert torch.equal(out, m(x))


def test_activation_clamping_matches_naive_forward(tmp_path) -> None:
    net, x, task = tiny()
    bounds = measure_input_bounds(net, x[:6], ["2", "5"])
    hard = harden_model(net, bounds)
    faults = [Fault("weight", "0", 3, (30,)), Fault("activation", "0", 5, (30,)),
              Fault("weight", "2", 7, (30,)), Fault("activation", "3", 2, (29, 30))]
    fast = Engine(hard, x, task).faulty_outputs(faults)
    seen: list[torch.Tensor] = []  # registered after the clamp: sees what layer 2 receives
    hook = hard[2].register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    naive = Engine(hard, x, task, strategy="full").faulty_outputs(faults)
    hook.remove()
    for a, b in zip(fast, naive, strict=True):
        assert torch.equal(a, b)
    lo, hi = bounds["2"]
    assert seen and all(float(t.min()) >= lo and float(t.max()) <= hi for t in seen)
    unclamped = Engine(net, x, task).faulty_outputs(faults[1:2])[0]
    assert not torch.equal(unclamped, fast[1])  # the activation fault is clamped away
    store = make_store(tmp_path, net, x, task)
    res = paired_reinjection(store, net, [], CRIT, Recorder(x, task), hardened=hard)
    assert res.simulated == len(res.fault_ids)  # everything re-run on the hardened model
    assert "after" in res.fault_free and isinstance(res.fault_free["changed"], bool)
    assert res.after.sum() <= res.before.sum()


def test_fault_free_identity_is_checked() -> None:
    net, _, _ = tiny()
    assert check_fault_free(net, [invariant(net, "0"), Protection("ecc", "2")]) == 18 + 36
    bogus = Protection("invariant", "0", bits=(31,), values=1 << 31)  # not all negative
    with pytest.raises(HardeningError, match="without a fault"):
        check_fault_free(net, [bogus])


def test_bootstrap_and_stratified_estimates() -> None:
    rng = np.random.default_rng(0)
    b = rng.random(400) < 0.3
    a = b & (rng.random(400) < 0.2)
    keys = ["s1"] * 150 + ["s2"] * 250
    N = {"s1": 1000, "s2": 5000}
    imp, (lo, hi) = paired_bootstrap(b, a, keys, N, n_boot=500, seed=1)
    w1, w2 = 1000 / 6000, 5000 / 6000
    pb = w1 * b[:150].mean() + w2 * b[150:].mean()
    pa = w1 * a[:150].mean() + w2 * a[150:].mean()
    assert imp == pytest.approx((pb - pa) / pb)
    assert lo <= imp <= hi and 0.6 < lo and hi <= 1.0
    assert paired_bootstrap(b, a, keys, N, n_boot=500, seed=1) == (imp, (lo, hi))
    assert paired_bootstrap(b, b, keys, N, n_boot=200)[0] == 0.0
    assert np.isnan(paired_bootstrap(a & False, a & False, keys, N)[0])
    est = stratified_cfr(b, keys, N, 0.95)
    assert est["cfr"] == pytest.approx(pb) and est["ci"][0] < pb < est["ci"][1]


def tiny_run(root) -> tuple:
    from flipguard.campaign import open_campaign, run_campaign
    from flipguard.data import make_synthetic
    from flipguard.models import CAEConfig, build_cae
    from flipguard.study.engines import RunEngineFactory
    from flipguard.study.rundir import (
        DataSection,
        ModelSection,
        RunConfig,
        ThresholdSection,
        save_run,
    )

    data = make_synthetic(root / "data", n_train=8, n_test=6, size=32, seed=0)
    params = {"input_size": 32, "channels": 1, "width": 0.25, "latent_dim": 8}
    torch.manual_seed(0)
    cfg = RunConfig(data=DataSection(path=str(data), size=32),
                    model=ModelSection(kind="cae", params=params),
                    score={"map": "l2", "smooth_sigma": 0, "reduce": "mean"},
                    threshold=ThresholdSection(value=0.0045))
    run = save_run(root / "run", cfg, build_cae(CAEConfig(**params)).eval())
    fac = RunEngineFactory(str(run), images=4)
    with open_campaign(run, PlanConfig(strata="layer", error=0.2, confidence=0.9), fac) as st:
        run_campaign(st, fac)
        ids = [pf.fault_id for pf, _ in st.results()]
    return run, ids


def test_cli_harden_end_to_end(tmp_path) -> None:
    import hashlib
    import json

    import typer
    from typer.testing import CliRunner

    from flipguard.cli.harden import register
    from flipguard.harden.module import clamped_layers
    from flipguard.study.rundir import load_run

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    run, ids = tiny_run(tmp_path)
    res = CliRunner().invoke(app, ["harden", str(run), "--budget", "0.02", "--schemes",
                                   "tmr,parity,ecc,range,act", "--criterion", "any-flip",
                                   "--boot", "200", "--hardware", "systolic", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out == json.loads((run / "hardening.json").read_text())
    for key in ("budget", "overhead", "protections", "cfr_before", "cfr_after",
                "relative_improvement", "ci", "table", "curve", "fault_free"):
        assert key in out
    assert out["budget"] == 0.02 and 0 < out["overhead"] <= 0.02
    assert out["campaign"]["fault_ids_sha256"] == \
        hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    assert out["n_faults"] == len(ids) and out["cfr_before"]["critical"] > 0
    prots = [Protection.from_dict({k: v for k, v in p.items() if k != "label"})
             for p in out["protections"]]
    assert {p.scheme for p in prots} <= {"tmr", "parity", "ecc", "range"} and prots
    assert out["cfr_after"]["cfr"] <= out["cfr_before"]["cfr"]
    assert out["schema"] == "flipguard.hardening/2" and out["p_value"] is not None
    assert out["ci"][0] <= out["relative_improvement"] <= out["ci"][1] <= 1.0
    # what each protection covers: one row per scheme in use, memory bits add up
    cov = {c["scheme"]: c for c in out["coverage"]}
    assert set(cov) == {p.scheme for p in prots} | {"act"}
    assert sum(c["memory_bits"] for c in cov.values()) == out["cost_bits"]
    assert all(c["locations"] == ["storage"] for k, c in cov.items() if k != "act")
    # over the systolic exposure: PE-register faults stay, so no more than all-in-storage
    ex = out["exposure"]
    assert ex["hardware"] == "systolic" and 0 < ex["covered_share"] < 1
    assert ex["relative_improvement"] <= ex["relative_improvement_if_all_storage"] + 1e-12
    assert ex["locations"]["weight"]["registers"] > 0
    # the deployable hardened model reloads as a run and computes what harden_model does
    base, hard = load_run(run), load_run(run / "hardened")
    clamps = out["activation_clamps"]["layers"]
    assert clamped_layers(hard.model) == list(clamps)
    ref = harden_model(base.model, {k: tuple(v) for k, v in clamps.items()})
    x = base.load_data().test
    assert torch.equal(hard.model(x), ref(x))
    # no campaign: one-line error, exit code 2
    (run / "campaign.sqlite").unlink()
    res = CliRunner().invoke(app, ["harden", str(run)])
    assert res.exit_code == 2 and "campaign.sqlite" in res.output
