"""CAE architecture, configuration and ``load_model``."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch
import torch.fx
from torch import nn

from flipguard.errors import ConfigError, FlipguardError
from flipguard.models import CAEConfig, ModelLoadError, build_cae, count_parameters, load_model


def _spec_params(c: int, d: int, size: int) -> int:
    """Closed-form parameter count from the architecture table (width 1)."""
    enc = [(c, 32, 4), (32, 32, 4), (32, 32, 3), (32, 64, 4), (64, 64, 3), (64, 128, 4),
           (128, 64, 3), (64, 32, 3), (32, d, size // 16)]
    # decoder: every layer mirrored (in/out swapped); biases sized by the mirrored output
    dec = [(o, i, k) for i, o, k in reversed(enc)]
    return sum(i * o * k * k + o for i, o, k in enc + dec)


def test_default_parameter_count():
    model = build_cae(CAEConfig())
    assert count_parameters(model) == _spec_params(1, 100, 128) == 1_048_549
    assert count_parameters(build_cae(CAEConfig(channels=3))) == _spec_params(3, 100, 128)


@pytest.mark.parametrize(
    ("size", "channels", "width", "latent"),
    [(16, 1, 0.25, 4), (32, 3, 0.5, 16), (64, 1, 1.0, 32), (128, 3, 0.125, 100)],
)
def test_output_shapes_and_range(size, channels, width, latent):
    model = build_cae(CAEConfig(input_size=size, channels=channels, width=width,
                                latent_dim=latent))
    x = torch.rand(2, channels, size, size)
    z = model.encoder(x)
    assert z.shape == (2, latent, 1, 1)
    y = model(x)
    assert y.shape == x.shape
    assert torch.equal(y, model.decoder(z))
    assert ((y >= 0) & (y <= 1)).all()


def test_layer_structure_128():
    model = build_cae(CAEConfig(width=0.25))
    enc, dec = model.encoder, model.decoder
    convs = [m for m in enc if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs] == [
        (4, 2, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1), (3, 1, 1), (3, 1, 1),
        (8, 1, 0)]
    assert [m.out_channels for m in convs] == [8, 8, 8, 16, 16, 32, 16, 8, 100]
    assert isinstance(enc[-1], nn.Conv2d)  # linear latent layer, no activation after it
    assert all(isinstance(enc[i], nn.LeakyReLU) and enc[i].negative_slope == 0.2
               for i in range(1, len(enc) - 1, 2))
    tconvs = [m for m in dec if not isinstance(m, (nn.LeakyReLU, nn.Sigmoid))]
    assert all(isinstance(m, nn.ConvTranspose2d) for m in tconvs) and len(tconvs) == 9
    assert [(m.kernel_size[0], m.stride[0]) for m in tconvs] == [
        (8, 1), (3, 1), (3, 1), (4, 2), (3, 1), (4, 2), (3, 1), (4, 2), (4, 2)]
    assert isinstance(dec[-1], nn.Sigmoid) and tconvs[-1].out_channels == 1
    names = dict(model.named_modules())
    assert isinstance(names["encoder.0"], nn.Conv2d) and "decoder.16" in names
    # spatial sizes along the encoder of a 128 px image
    sizes, h = [], torch.rand(1, 1, 128, 128)
    for m in enc:
        h = m(h)
        if isinstance(m, nn.Conv2d):
            sizes.append(h.shape[-1])
    assert sizes == [64, 32, 32, 16, 16, 8, 8, 8, 1]


def test_width_min_one_channel():
    model = build_cae(CAEConfig(input_size=16, width=0.001, latent_dim=2))
    assert all(m.out_channels == 1 for m in model.encoder[:-1] if isinstance(m, nn.Conv2d))
    assert model(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_fx_traceable():
    model = build_cae(CAEConfig(input_size=32, width=0.25, latent_dim=8))
    gm = torch.fx.symbolic_trace(model)
    x = torch.rand(3, 1, 32, 32)
    assert torch.equal(gm(x), model(x))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "encoder.0" in targets and "decoder.16" in targets


def _spatial_params(c: int, d: int, stride: int) -> int:
    """Closed-form count of the spatial bottleneck (3x3 latent conv both ways)."""
    k5 = 4 if stride == 16 else 3
    enc = [(c, 32, 4), (32, 32, 4), (32, 32, 3), (32, 64, 4), (64, 64, 3), (64, 128, k5),
           (128, 64, 3), (64, 32, 3), (32, d, 3)]
    dec = [(o, i, k) for i, o, k in reversed(enc)]
    return sum(i * o * k * k + o for i, o, k in enc + dec)


@pytest.mark.parametrize("stride", [16, 8])
def test_spatial_bottleneck_is_fully_convolutional(stride):
    cfg = CAEConfig(bottleneck="spatial", latent_dim=16, latent_stride=stride)
    model = build_cae(cfg)
    assert count_parameters(model) == _spatial_params(1, 16, stride)
    x = torch.rand(2, 1, 128, 128)
    assert model.encoder(x).shape == (2, 16, 128 // stride, 128 // stride)
    assert model(x).shape == x.shape
    # fully convolutional: any multiple of 16, also non-square
    assert model(torch.rand(1, 1, 64, 96)).shape == (1, 1, 64, 96)
    # injectable layers stay Conv2d / ConvTranspose2d, the graph traces with torch.fx
    kinds = {type(m) for m in model.modules() if not list(m.children())}
    assert kinds <= {nn.Conv2d, nn.ConvTranspose2d, nn.LeakyReLU, nn.Sigmoid}
    gm = torch.fx.symbolic_trace(model)
    assert torch.equal(gm(x), model(x))
    # the first decoder layer's fan is 16 * 9 / 1 (He init on the 3x3 map, not the 1x1 rule)
    std = float(model.decoder[0].weight.std())
    assert abs(std - (2 / 1.04) ** 0.5 / (16 * 9) ** 0.5) < 0.15 * std
    with pytest.raises(ConfigError, match="latent_stride"):
        build_cae(CAEConfig(latent_stride=8))


def test_seeded_init_without_global_rng():
    cfg = CAEConfig(input_size=16, width=0.25, latent_dim=4, seed=3)
    state = torch.random.get_rng_state()
    a, b = build_cae(cfg), build_cae(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    c = build_cae(cfg.model_copy(update={"seed": 4}))
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"input_size": 100}, "input_size"), ({"input_size": 0}, "input_size"),
     ({"width": 0}, "width"), ({"channels": 0}, "channels"), ({"latent_dim": -1}, "latent_dim"),
     ({"latent": 3}, "latent")],
)
def test_config_errors_are_one_line(kwargs, field):
    with pytest.raises(ConfigError, match=f"CAEConfig.{field}") as exc:
        CAEConfig(**kwargs)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=f"CAEConfig.{field}"):
        CAEConfig.model_validate(kwargs)


def test_config_assignment_is_validated():
    cfg = CAEConfig(input_size=32)
    with pytest.raises(ConfigError, match="CAEConfig.input_size"):
        cfg.input_size = 40
    cfg.input_size = 48
    assert build_cae(cfg)(torch.rand(1, 1, 48, 48)).shape == (1, 1, 48, 48)


# ---------------------------------------------------------------- load_model

FACTORY = '''
import torch
from torch import nn

def make(hidden=3):
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))

def not_a_module():
    return 42

def broken():
    raise RuntimeError("boom")

class Maker:
    @staticmethod
    def create():
        return nn.Linear(2, 2)
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    name = f"fg_factory_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_model_success_with_weights(factory_module, tmp_path):
    src = load_model(f"{factory_module}:make", hidden=5)
    assert src[0].out_features == 5 and not src.training
    w = tmp_path / "w.pt"
    torch.save(src.state_dict(), w)
    loaded = load_model(f"{factory_module}:make", weights=w, hidden=5)
    x = torch.rand(4, 2)
    assert torch.equal(loaded(x), src(x)) and not loaded.training
    torch.save({"state_dict": src.state_dict()}, tmp_path / "wrapped.pt")
    wrapped = load_model(f"{factory_module}:make", weights=tmp_path / "wrapped.pt", hidden=5)
    assert torch.equal(wrapped(x), src(x))
    assert isinstance(load_model(f"{factory_module}:Maker.create"), nn.Linear)
    cae = load_model("flipguard.models:build_cae",
                     cfg=CAEConfig(input_size=16, width=0.25, latent_dim=2))
    assert cae(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize(
    ("spec", "match"),
    [("no_colon_here", "expected 'package.module:factory'"),
     ("a:b:c", "expected 'package.module:factory'"),
     ("fg_surely_missing_module_xyz:make", "not found"),
     ("{mod}:nope", "no attribute 'nope'"),
     ("{mod}:not_a_module", "expected a torch.nn.Module"),
     ("{mod}:broken", "calling the factory failed .*boom"),
     ("{mod}:torch", "not callable")],
)
def test_load_model_spec_errors(factory_module, spec, match):
    with pytest.raises(ModelLoadError, match=match) as exc:
        load_model(spec.format(mod=factory_module))
    assert "\n" not in str(exc.value) and isinstance(exc.value, FlipguardError)


def test_load_model_weight_errors(factory_module, tmp_path):
    spec = f"{factory_module}:make"
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_model(spec, weights=tmp_path / "missing.pt")
    torch.save(load_model(spec, hidden=4).state_dict(), tmp_path / "h4.pt")
    with pytest.raises(ModelLoadError, match="shape mismatch 0.weight"):
        load_model(spec, weights=tmp_path / "h4.pt", hidden=3)
    torch.save({"0.weight": torch.zeros(3, 2)}, tmp_path / "partial.pt")
    with pytest.raises(ModelLoadError, match="missing keys 0.bias"):
        load_model(spec, weights=tmp_path / "partial.pt")
    sd = load_model(spec).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected keys extra.weight"):
        load_model(spec, weights=tmp_path / "extra.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="expected a state dict"):
        load_model(spec, weights=tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(spec, weights=tmp_path / "junk.pt")


def test_load_model_safetensors(factory_module, tmp_path):
    spec = f"{factory_module}:make"
    src = load_model(spec)
    path = tmp_path / "w.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"\0" * 16)
        with pytest.raises(ModelLoadError, match="needs the 'safetensors' package"):
            load_model(spec, weights=path)
    else:
        save_file(src.state_dict(), str(path))
        x = torch.rand(2, 2)
        assert torch.equal(load_model(spec, weights=path)(x), src(x))


def _memory_reference(z: torch.Tensor, items: torch.Tensor, shrink: float) -> torch.Tensor:
    """MemAE addressing written out per latent vector in float64 (Gong et al., eq. 4-7)."""
    import numpy as np

    zz = z.double().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()
    m = items.double().numpy()
    out = np.empty_like(zz)
    for i, q in enumerate(zz):
        logits = m @ q
        w = np.exp(logits - logits.max())
        w /= w.sum()
        w = np.where(w > shrink, w, 0.0)  # hard shrinkage, then renormalise
        w /= w.sum()
        out[i] = w @ m
    n, c, h, wd = z.shape
    return torch.from_numpy(out).reshape(n, h, wd, c).permute(0, 3, 1, 2)


def test_memory_module_matches_reference_and_is_convex():
    from flipguard.models.memory import Memory

    torch.manual_seed(0)
    mem = Memory(items=6, dim=4)
    with torch.no_grad():
        mem.weight.mul_(8.0)  # sharp attention: shrinkage removes some items
    z = torch.randn(2, 4, 3, 5)
    att = mem.attention(z)
    assert torch.allclose(att.sum(1), torch.ones(att.shape[0]))
    assert bool((att == 0).any()) and bool(((att == 0) | (att >= 1 / 6)).all())
    out = mem(z)
    assert all(torch.equal(out[i : i + 1], mem(z[i : i + 1])) for i in range(2))  # per row
    assert torch.allclose(out.double(), _memory_reference(z, mem.weight.detach(), 1 / 6),
                          atol=1e-5)
    lo, hi = mem.weight.min(0).values, mem.weight.max(0).values  # convex combination of items
    per_pos = out.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(((per_pos >= lo - 1e-5) & (per_pos <= hi + 1e-5)).all())


def test_cae_with_memory():
    plain = build_cae(CAEConfig(input_size=32, width=0.25, latent_dim=8, bottleneck="spatial"))
    model = build_cae(CAEConfig(input_size=32, width=0.25, latent_dim=8, bottleneck="spatial",
                                memory=5))
    assert count_parameters(model) == count_parameters(plain) + 5 * 8
    assert "memory.weight" in model.state_dict() and "memory.weight" not in plain.state_dict()
    x = torch.rand(2, 1, 32, 32)
    gm = torch.fx.symbolic_trace(model)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(ConfigError, match="CAEConfig.memory"):
        build_cae(CAEConfig(input_size=32, memory=4))  # vector bottleneck
    with pytest.raises(ConfigError, match="CAEConfig.memory"):
        CAEConfig(memory=-1)
