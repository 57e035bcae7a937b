"""Architecture search building blocks: every point of the spaces builds and trains a step,
bounded activations, cost counts against independent counts, Pareto bookkeeping against
brute force and Optuna, pasted defects, the data split."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from flipguard.errors import ConfigError
from flipguard.faults import Fault
from flipguard.inject import DetectionTask, Engine
from flipguard.nas import (
    ACTIVATIONS,
    CAESpace,
    ClipAct,
    LearnedClip,
    Ranger,
    count_macs,
    detection_data,
    dominates,
    load_space,
    memory_bits,
    nondominated_ranks,
    pareto_front,
    profile_bounds,
)
from flipguard.nas.config import parse_objectives
from flipguard.nas.digits import DigitsSpace
from flipguard.nas.front import rank_agreement, select_spread


def _train_step(net: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    y = net(x)
    loss = nn.functional.cross_entropy(y, target) if target is not None else \
        (y - x).square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))


def test_every_structural_point_of_the_cae_space_builds_and_trains_a_step():
    # widths and latent size only set channel counts; every other choice changes the graph,
    # so the space with one width and one latent size holds every structure of the full one
    space = CAESpace(widths=(4,), latents=(4,))
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    n = 0
    for arch in space.grid():
        net = space.build(arch, (1, 16, 16))
        assert net(x).shape == x.shape
        _train_step(net, x)
        n += 1
    assert n == 117 * 3 * 2 * len(ACTIVATIONS)
    # the full space: every width and latent value in some network
    full = CAESpace()
    for w, lat in itertools.zip_longest((8, 16, 32, 64), (16, 32, 64, 128)):
        arch = {"depth": 4, **{f"width{i}": w for i in range(4)},
                **{f"kernel{i}": 3 for i in range(4)}, "refine": 0,
                "latent_kind": "vector", "latent": lat, "act": "leaky"}
        net = full.build(arch, (1, 32, 32))
        assert net.encoder[0].out_channels == w and net.encoder[-1].out_channels == lat


def test_cae_space_size_and_bad_inputs():
    space = CAESpace()
    per_depth = {d: (4 * 3) ** d for d in (2, 3, 4)}
    assert space.size() == sum(per_depth.values()) * 3 * 2 * 4 * len(ACTIVATIONS)
    arch = next(iter(space.grid()))
    with pytest.raises(ConfigError, match="depth"):
        space.build(arch, (1, 18, 18))
    with pytest.raises(ConfigError, match="act"):
        space.build({**arch, "act": "tanh"}, (1, 16, 16))
    with pytest.raises(ConfigError, match="missing parameter"):
        space.build({"depth": 2}, (1, 16, 16))


def test_every_point_of_the_digits_space_builds_and_trains_a_step():
    space = load_space("digits")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 3])
    archs = list(space.grid())
    assert len(archs) == 3 * 3 * 2 * 2 * 5 == space.size()
    for arch in archs:
        net = space.build(arch, (1, 8, 8))
        assert net(x).shape == (4, 10)
        _train_step(net, x, y)
    assert isinstance(space, DigitsSpace) and space.baseline((1, 8, 8)) is not None


def test_space_sampling_through_optuna_is_valid_and_conditional():
    optuna = pytest.importorskip("optuna")

    space = CAESpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        arch = space.sample(trial)
        assert space.validate(arch) == arch  # exactly the active parameters
        assert all(f"width{i}" in arch for i in range(arch["depth"]))
        assert not any(f"width{i}" in arch for i in range(arch["depth"], 4))
        assert ("skip" in arch) == (arch["refine"] == 1)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("refine,skip", [(0, False), (1, False), (1, True)])
def test_engine_and_exposure_see_the_search_networks_as_graphs(act, refine, skip):
    from flipguard.ra import analyse, build_exposure

    space = CAESpace()
    arch = {"depth": 2, "width0": 8, "kernel0": 4, "width1": 16, "kernel1": 5,
            "refine": refine, "latent_kind": "spatial", "latent": 16, "act": act}
    if refine:
        arch["skip"] = skip
    net = space.build(arch, (1, 16, 16)).eval()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    profile_bounds(net, x)
    graph = analyse(net, x)
    assert graph.method == "fx"
    # a bounded activation is an element-wise op: the next layer *reads* the value (only a
    # residual add would end its life as a fused op)
    fused = [u for layer in graph.layers for u in layer.uses if not u.reads]
    assert bool(fused) == (refine == 1 and skip)
    # the fault engine runs the traced graph (no fall-back to full forwards) and agrees
    # with a naive in-place injection
    task = DetectionTask(lambda a, b: (a - b).abs().flatten(1).amax(1), 0.5, [0, 1, 0])
    eng = Engine(net, x, task)
    assert eng.strategy_used == "graph", eng.fallback_reason
    p = build_exposure(net, x[:1], "systolic")
    assert p.total > 0
    fault = Fault("weight", "encoder.0", 3, (30,))
    ref = Engine(net, x, task, strategy="full")
    assert [o.accuracy for o in eng.run([fault])] == [o.accuracy for o in ref.run([fault])]


def test_profiled_bounds_keep_clean_outputs_and_stop_huge_values():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 1, 6, 6, generator=g)
    with torch.no_grad():
        for cls in (Ranger, ClipAct):
            net = nn.Sequential(nn.Conv2d(1, 3, 3), cls(), nn.Conv2d(3, 2, 1))
            out_free = net(x)  # unprofiled: the bound is infinite, the activation plain
            ref = nn.functional.leaky_relu if cls is Ranger else torch.relu
            act_out = ref(net[0](x), 0.2) if cls is Ranger else ref(net[0](x))
            assert torch.equal(net[1](net[0](x)), act_out)
            assert profile_bounds(net, x) == 1
            assert torch.equal(net(x), out_free)  # the profile covers the training data
            assert float(net[1].hi) == pytest.approx(float(act_out.max()))
            big = net[1](torch.full((1, 3, 1, 1), 3e38))
            assert float(big.max()) == (float(net[1].hi) if cls is Ranger else 0.0)
            assert profile_bounds(net, x) == 1 and torch.equal(net(x), out_free)  # idempotent
    lc = LearnedClip(3, init=1.5)
    y = lc(torch.tensor([[[[5.0]], [[-1.0]], [[0.5]]]]))
    assert y.flatten().tolist() == [1.5, 0.0, 0.5]
    assert lc.bound.requires_grad


def test_macs_equal_the_exposure_models_gemm_sizes_and_memory_counts_bits():
    from flipguard.ra import analyse

    space = CAESpace()
    trial = _RngTrial(np.random.default_rng(4))
    for _ in range(12):
        net = space.build(space.sample(trial), (1, 32, 32))
        x = torch.zeros(1, 1, 32, 32)
        assert count_macs(net, x) == sum(ly.macs for ly in analyse(net, x).layers)
        n_par = sum(p.numel() for p in net.parameters())
        n_buf = sum(b.numel() for b in net.buffers())
        assert memory_bits(net) == 32 * (n_par + n_buf)
    lin = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    # int8: 8 bits per weight/bias, one fp32 scale per tensor; int8-channel per out channel
    assert memory_bits(lin, "int8") == 8 * (20 + 4 + 8) + 32 * 3
    assert memory_bits(lin, "int8-channel") == 8 * 32 + 32 * (4 + 1 + 2)
    assert memory_bits(lin, "fp16") == 16 * 32
    assert count_macs(lin, torch.zeros(7, 5)) == 20 + 8
    with pytest.raises(ConfigError, match="--format"):
        memory_bits(lin, "fp8")


class _RngTrial:
    """Stands in for an Optuna trial: uniform random choices."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list) -> object:
        return choices[int(self.rng.integers(len(choices)))]


def _brute_front(v: np.ndarray, dirs: list[str]) -> list[int]:
    out = []
    for i in range(len(v)):
        if not any(dominates(v[j], v[i], dirs) for j in range(len(v)) if j != i):
            out.append(i)
    return out


def test_pareto_front_and_ranks_against_brute_force_with_ties_and_duplicates():
    rng = np.random.default_rng(0)
    for rep in range(60):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        v = rng.integers(0, 4, size=(n, k)).astype(float)  # few levels: many ties
        if rep % 3 == 0 and n > 1:
            v[-1] = v[0]  # an exact duplicate
        dirs = [["maximize", "minimize"][int(b)] for b in rng.integers(0, 2, k)]
        front = pareto_front(v, dirs).tolist()
        assert front == _brute_front(v, dirs)
        ranks = nondominated_ranks(v, dirs)
        for i in range(n):  # rank r: not dominated by rank >= r, dominated by some r - 1
            assert not any(dominates(v[j], v[i], dirs) for j in range(n) if ranks[j] >= ranks[i])
            if ranks[i] > 0:
                assert any(dominates(v[j], v[i], dirs) for j in range(n)
                           if ranks[j] == ranks[i] - 1)


def test_pareto_front_matches_optuna_best_trials():
    optuna = pytest.importorskip("optuna")

    rng = np.random.default_rng(1)
    dirs = ["maximize", "maximize", "minimize"]
    v = rng.integers(0, 5, size=(50, 3)).astype(float)
    study = optuna.create_study(directions=dirs)
    for row in v:
        study.add_trial(optuna.trial.create_trial(values=row.tolist(), params={},
                                                  distributions={}))
    assert sorted(t.number for t in study.best_trials) == pareto_front(v, dirs).tolist()


def test_pareto_input_errors_and_helpers():
    with pytest.raises(ConfigError, match="NaN"):
        pareto_front([[np.nan, 1.0]], ["maximize", "maximize"])
    with pytest.raises(ConfigError, match="directions"):
        pareto_front([[1.0]], ["up"])
    assert pareto_front(np.zeros((0, 2)), ["maximize", "maximize"]).tolist() == []
    rows = [{"values": [float(i)], "i": i} for i in range(10)]
    assert [r["i"] for r in select_spread(rows, 4)] == [0, 3, 6, 9]
    assert rank_agreement([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])["tau"] == pytest.approx(-1.0)
    assert rank_agreement([1, 2], [1, 2])["tau"] is None
    assert parse_objectives("quality, memory") == ("quality", "memory")
    for bad in ("quality,quality", "speed", ""):
        with pytest.raises(ConfigError, match="--objectives"):
            parse_objectives(bad)


def test_pasted_defects_have_exact_masks_and_are_seeded():
    from flipguard.data.defects import paste_defects

    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 32, 32, generator=g) * 0.5 + 0.25
    bad, masks, kinds = paste_defects(x, seed=4)
    assert kinds == ["scratch", "crack", "blob"] * 2
    changed = (bad != x).any(dim=1, keepdim=True)
    assert torch.equal(changed, masks > 0) and bool((masks.flatten(1).sum(1) > 0).all())
    assert torch.equal(bad[masks.expand_as(bad) == 0], x[masks.expand_as(x) == 0])
    again, m2, _ = paste_defects(x, seed=4)
    assert torch.equal(again, bad) and torch.equal(m2, masks)
    assert not torch.equal(paste_defects(x, seed=5)[1], masks)
    # image i's defect depends on (seed, i) only, not on the other images
    assert torch.equal(paste_defects(x[:2], seed=4)[0], bad[:2])
    # a white image: a bright shift is clipped away, so the defect is made dark instead
    white = torch.ones(3, 1, 32, 32)
    wb, wm, _ = paste_defects(white, seed=0)
    assert bool((wm.flatten(1).sum(1) > 0).all()) and float(wb.max()) == 1.0
    assert torch.equal((wb != white).any(1, keepdim=True), wm > 0)
    with pytest.raises(ConfigError, match="kinds"):
        paste_defects(x, kinds=("dent",))


def test_detection_data_split_is_disjoint_and_never_touches_other_images():
    g = torch.Generator().manual_seed(5)
    imgs = torch.rand(50, 1, 16, 16, generator=g)
    d = detection_data(imgs, val_fraction=0.2, split_seed=1)
    rows = {tuple(r.flatten().tolist()): i for i, r in enumerate(imgs)}

    def ids(t: torch.Tensor) -> set[int]:
        return {rows[tuple(r.flatten().tolist())] for r in t}

    tr, cal = ids(d.train), ids(d.calib)
    n_val = int((d.val_labels == 0).sum())
    val = ids(d.val[:n_val])
    assert tr | cal | val == set(range(50)) and not (tr & cal or tr & val or cal & val)
    assert d.val_labels.tolist() == [0] * n_val + [1] * n_val
    assert d.val_masks is not None and float(d.val_masks[:n_val].sum()) == 0.0
    # defective copies: each differs from its normal image exactly inside its mask
    diff = (d.val[n_val:] != d.val[:n_val]).any(1, keepdim=True)
    assert torch.equal(diff, d.val_masks[n_val:] > 0)
    assert detection_data(imgs, 0.2, 1).fingerprint() == d.fingerprint()
    assert detection_data(imgs, 0.2, 2).fingerprint() != d.fingerprint()
    with pytest.raises(ConfigError, match="at least 12"):
        detection_data(imgs[:5])


def test_load_space_hook_and_errors(tmp_path, monkeypatch):
    (tmp_path / "my_nas_space.py").write_text(
        "from flipguard.nas import CAESpace\n"
        "space = CAESpace(depths=(2,), widths=(4,))\n"
        "not_a_space = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sp = load_space("my_nas_space:space")
    assert sp.name == "cae" and sp.size() == 3 * 3 * 3 * 2 * 4 * len(ACTIVATIONS)
    for spec, msg in (("my_nas_space:nope", "no attribute"), ("no_such_mod_x:s", "import"),
                      ("my_nas_space:not_a_space", "not a flipguard"), ("cae2", "expected")):
        with pytest.raises(ConfigError, match=msg):
            load_space(spec)
