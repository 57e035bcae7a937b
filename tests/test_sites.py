"""Fault sites: coordinates, kernels, populations and sampling against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn

from flipguard.errors import FlipguardError
from flipguard.faults import (
    FaultSite,
    SiteSpace,
    coords_of,
    get_format,
    index_of,
    kernel_ids,
    kernel_of,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),          # weight (4, 1, 3, 3)
        nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 2, groups=2),  # weight (4, 3, 2, 2)
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 3, bias=False),
    )


MODULES = {
    "conv2d": lambda: nn.Conv2d(4, 6, (2, 3), groups=2),
    "convT2d": lambda: nn.ConvTranspose2d(6, 4, (3, 2), groups=2),
    "convT2d_g1": lambda: nn.ConvTranspose2d(3, 5, 2),
    "convT1d_g3": lambda: nn.ConvTranspose1d(6, 9, 2, groups=3),
    "linear": lambda: nn.Linear(5, 3),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_coords_round_trip_and_kernel_membership(name):
    m = MODULES[name]()
    shape = tuple(m.weight.shape)
    ids = torch.arange(m.weight.numel()).reshape(shape)
    flat = np.arange(m.weight.numel())
    coords = coords_of(flat, shape)
    assert (ids[tuple(torch.from_numpy(c) for c in coords)].numpy() == flat).all()
    assert (index_of(coords, shape) == flat).all()
    assert coords_of(int(flat[-1]), shape) == tuple(s - 1 for s in shape)
    # kernel = output channel, by explicit slicing of the stored layout
    kern = kernel_of(m, "weight", flat)
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d):
        g, ipg, opg = m.groups, shape[0] // m.groups, shape[1]
        for k in range(m.out_channels):
            gi, c = divmod(k, opg)
            members = ids[gi * ipg:(gi + 1) * ipg, c].flatten().numpy()
            assert set(flat[kern == k]) == set(members)
            if g == 1:
                assert set(members) == set(ids[:, k].flatten().numpy())
    else:
        for k in range(shape[0]):
            assert set(flat[kern == k]) == set(ids[k].flatten().numpy())
    assert (kernel_ids(m, "weight").expand(shape).flatten().numpy() == kern).all()
    assert kernel_of(m, "bias", 2) == 2


@pytest.mark.parametrize("name", ["conv2d", "convT2d", "convT1d_g3", "linear"])
def test_kernel_is_the_output_channel_the_weight_feeds(name):
    """Behavioural oracle: perturbing a weight changes only its kernel's output channel."""
    m = MODULES[name]().double()
    if isinstance(m, nn.Linear):
        x = torch.randn(1, m.in_features, dtype=torch.float64)
    else:
        x = torch.randn(1, m.in_channels, *([4] * (m.weight.dim() - 2)), dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        for i in range(0, m.weight.numel(), 5):
            m.weight.view(-1)[i] += 1.0
            diff = (m(x) - ref).abs() > 1e-9
            m.weight.view(-1)[i] -= 1.0
            channels = diff.reshape(1, diff.shape[1], -1).any(-1)[0].nonzero().flatten().tolist()
            assert channels == [kernel_of(m, "weight", i)]


def brute_force(model: nn.Module, fmt_bits: int, x: torch.Tensor) -> list[tuple]:
    """Every (target, layer, index, bit, kernel) of conv/linear layers, by explicit loops."""
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, o))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d
                                                              | nn.Linear)]
    model(x)
    for h in hooks:
        h.remove()
    sites = []
    for name, out in outs.items():
        mod = dict(model.named_modules())[name]
        tensors = {"weight": mod.weight, "bias": mod.bias, "activation": out[0]}
        for target, t in tensors.items():
            if t is None:
                continue
            for idx in range(t.numel()):
                c = np.unravel_index(idx, t.shape)
                if target == "weight" and isinstance(mod, nn.ConvTranspose2d):
                    kern = (c[0] // (t.shape[0] // mod.groups)) * t.shape[1] + c[1]
                else:
                    kern = c[0] if t.dim() else 0
                for bit in range(fmt_bits):
                    sites.append((target, name, idx, bit, int(kern)))
    return sites


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_populations_and_decode_match_brute_force(fmt):
    model, x = tiny_model(), torch.randn(1, 2, 6, 6)
    space = SiteSpace(model, targets=("weight", "bias", "activation"), fmt=fmt,
                      example_input=x)
    bits = get_format(fmt).bits
    brute = brute_force(model, bits, x)
    assert [(ls.name, ls.target) for ls in space.layers] == list(
        dict.fromkeys((s[1], s[0]) for s in brute))
    assert space.population() == len(brute)
    exp_bits = get_format(fmt).bits_of_field("exponent" if fmt == "bf16" else "sign")
    for ls in space.layers:
        assert ls.population == ls.numel * bits
        mine = [s for s in brute if s[:2] == (ls.target, ls.name)]
        strata = [({}, lambda s: True), ({"bit": 3}, lambda s: s[3] == 3),
                  ({"bits": exp_bits}, lambda s: s[3] in exp_bits)]
        for k in {0, ls.n_kernels - 1}:
            strata += [({"kernel": k}, lambda s, k=k: s[4] == k),
                       ({"kernel": k, "bit": bits - 1},
                        lambda s, k=k: s[4] == k and s[3] == bits - 1)]
        for params, pred in strata:
            expected = {(s[2], s[3]) for s in mine if pred(s)}
            n = space.population(ls.name, target=ls.target, **params)
            assert n == len(expected)
            idx, b = space.decode(ls.name, np.arange(n), target=ls.target, **params)
            assert len(set(zip(idx.tolist(), b.tolist(), strict=True))) == n
            assert set(zip(idx.tolist(), b.tolist(), strict=True)) == expected
    field = "exponent" if fmt == "bf16" else "sign"
    assert space.population(bits=field) == sum(1 for s in brute if s[3] in exp_bits)
    strata = space.strata(by=("layer", "kernel", "bit"))
    assert sum(s.population for s in strata) == len(brute)
    assert len({s.key for s in strata}) == len(strata)
    assert sum(s.population for s in space.strata(by=("field",))) == len(brute)


def test_convtranspose_kernel_stratum_gathers_non_contiguous_elements():
    model = tiny_model()
    space = SiteSpace(model, layers=["2"])
    w_ids = torch.arange(model[2].weight.numel()).reshape(model[2].weight.shape)
    for k in range(6):
        g, c = divmod(k, 3)
        want = set(w_ids[g * 2:(g + 1) * 2, c].flatten().tolist())
        sites = space.sample(np.random.default_rng(k), space.population("2", kernel=k), "2",
                             kernel=k)
        assert {s.index for s in sites} == want and len(sites) == len(want) * 32
    g1 = SiteSpace(nn.ConvTranspose2d(3, 5, 2), fmt="fp16")
    ids = torch.arange(3 * 5 * 4).reshape(3, 5, 2, 2)
    for k in range(5):
        assert g1.layers[0].kernel_elements(k).tolist() == ids[:, k].flatten().tolist()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40),
       params=st.sampled_from([{}, {"bit": 5}, {"kernel": 1}, {"kernel": 3, "bits": (0, 7)}]))
def test_sampling_without_replacement_is_seeded_and_in_stratum(seed, n, params):
    model = tiny_model()
    space = SiteSpace(model, targets=("weight", "bias"), fmt="int8")
    ls = space.layer("2")
    allowed = {(int(i), int(b)) for i, b in zip(*space.decode("2", np.arange(
        space.population("2", **params)), **params), strict=True)}
    n = min(n, len(allowed))
    a = space.sample(np.random.default_rng(seed), n, "2", **params)
    assert a == space.sample(np.random.default_rng(seed), n, "2", **params)
    assert len(set(a)) == n and all(isinstance(s, FaultSite) for s in a)
    assert {(s.index, s.bit) for s in a} <= allowed
    assert all(s.layer == "2" and s.target == "weight" for s in a)
    if "kernel" in params:
        assert {ls.kernel_of(s.index) for s in a} <= {params["kernel"]}
    # top up without replacement until the stratum is exhausted
    rng, drawn = np.random.default_rng(seed), np.zeros(0, dtype=np.int64)
    while len(drawn) < len(allowed):
        extra = space.sample_indices(rng, min(7, len(allowed) - len(drawn)), "2",
                                     exclude=drawn, **params)
        assert not set(extra.tolist()) & set(drawn.tolist())
        drawn = np.concatenate([drawn, extra])
    assert sorted(drawn.tolist()) == list(range(len(allowed)))
    with pytest.raises(FlipguardError, match="n: expected"):
        space.sample_indices(rng, 1, "2", exclude=drawn, **params)


def test_sampling_is_uniform_chi_square():
    space = SiteSpace(nn.Linear(6, 2, bias=False), fmt="int8")
    n_stratum = space.population("", kernel=1, bits="magnitude")  # 6 elements x 7 bits = 42
    rng, counts = np.random.default_rng(1234), np.zeros(n_stratum)
    reps, n = 3000, 5
    for _ in range(reps):
        k = space.sample_indices(rng, n, "", kernel=1, bits="magnitude")
        counts += np.bincount(k, minlength=n_stratum)
    assert counts.sum() == reps * n
    assert stats.chisquare(counts).pvalue > 1e-3


def test_large_stratum_sampling_is_cheap_and_exact():
    big = SiteSpace(nn.Linear(2000, 625, bias=False))  # 40 M sites
    assert big.population("") == 2000 * 625 * 32
    k = big.sample_indices(np.random.default_rng(0), 20000, "")
    assert len(np.unique(k)) == 20000 and k.min() >= 0 and k.max() < 40_000_000
    sites = big.sample(np.random.default_rng(0), 3, "", bit=30)
    assert all(s.bit == 30 and 0 <= s.index < 1_250_000 for s in sites)


def test_activation_space_and_errors():
    model, x = tiny_model(), torch.randn(1, 2, 6, 6)
    space = SiteSpace(model, targets=("activation",), example_input=x, fmt="fp16")
    assert [ls.shape for ls in space.layers] == [(4, 4, 4), (6, 5, 5), (3,)]
    act = space.layer("0")
    assert act.n_kernels == 4 and act.kernel_of(2 * 16 + 5) == 2
    assert kernel_of(model[0], "activation", 2 * 16 + 5, shape=(4, 4, 4)) == 2
    assert model.training  # the probe forward restores the training flag
    with pytest.raises(FlipguardError, match=r"layer: unknown layer 'nope'; valid: 0, 2, 4"):
        space.population("nope")
    with pytest.raises(FlipguardError, match="valid: 0, 2, 4"):
        SiteSpace(model, layers=["0", "1"])
    with pytest.raises(FlipguardError, match="example_input"):
        SiteSpace(model, targets=("activation",))
    with pytest.raises(FlipguardError, match="target"):
        SiteSpace(model).layer("0", target="bias")
    with pytest.raises(FlipguardError, match="kernel"):
        space.population("0", kernel=4)
    with pytest.raises(FlipguardError, match="bit"):
        space.decode("0", 0, bit=16)
    with pytest.raises(FlipguardError, match="k: expected"):
        space.decode("0", space.population("0"))
    assert "\n" not in str(pytest.raises(FlipguardError, space.layer, "x").value)


def test_bound_format_uses_per_kernel_scales():
    model = tiny_model()
    space = SiteSpace(model, fmt="int8-channel")
    w = model[2].weight.detach()
    fmt = space.bound_format("2")
    for k in range(6):
        g, c = divmod(k, 3)
        members = torch.arange(w.numel()).reshape(w.shape)[g * 2:(g + 1) * 2, c].flatten()
        scale = fmt.select(members).scale
        assert torch.allclose(scale, w[g * 2:(g + 1) * 2, c].abs().max() / 127)
        q = fmt.select(members).encode(fmt.quantize(w).flatten()[members])
        assert q.abs().max().item() == 127
