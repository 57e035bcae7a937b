"""The CAE search space: convolutional autoencoders of the SSIM-AE family.

An architecture has ``depth`` stride-2 stages; stage ``i`` has ``width{i}`` channels and a
``kernel{i}`` x ``kernel{i}`` convolution (3, 4 or 5; padding and output padding chosen so
every stage halves / doubles the side exactly), optionally followed by a 3x3 refinement
convolution (``refine``) that may be a residual block (``skip``: ``act(x + conv(x))`` —
skips stay inside a stage, never from encoder to decoder, which would bypass the bottleneck
and reconstruct defects too). The bottleneck is linear, a vector (``latent_kind="vector"``:
a valid convolution over the whole remaining map, as in Bergmann et al.) or a map
(``"spatial"``: a 3x3 convolution), with ``latent`` channels; the decoder mirrors the
encoder with transposed convolutions and ends in a sigmoid. ``act`` is one of
:data:`flipguard.nas.activations.ACTIVATIONS` (bounded ones included). The baseline is the
default CAE, ``build_cae(CAEConfig(input_size=side, channels=C))``.

>>> space = CAESpace()
>>> arch = {"depth": 2, "width0": 8, "kernel0": 4, "width1": 16, "kernel1": 3, "refine": 1,
...         "skip": True, "latent_kind": "vector", "latent": 16, "act": "ranger"}
>>> net = space.build(arch, (1, 32, 32))
>>> net(torch.rand(2, 1, 32, 32)).shape
torch.Size([2, 1, 32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flipguard.errors import ConfigError
from flipguard.models import CAEConfig, build_cae
from flipguard.nas.activations import ACTIVATIONS, make_activation
from flipguard.nas.space import Param, SearchSpace

__all__ = ["CAESpace", "NASAutoencoder", "Residual"]

MAX_DEPTH = 4
_PAD = {3: (1, 1), 4: (1, 0), 5: (2, 1)}  # kernel -> (padding, transposed output padding)


class Residual(nn.Module):
    """``act(x + conv(x))`` with a 3x3 same-size convolution."""

    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv(x))


class NASAutoencoder(nn.Module):
    """``decoder(encoder(x))``; both halves are ``nn.Sequential`` (torch.fx traceable)."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential,
                 arch: dict[str, Any]) -> None:
        super().__init__()
        self.encoder, self.decoder, self.arch = encoder, decoder, dict(arch)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def _active(i: int) -> Any:
    return lambda a: a["depth"] > i


class CAESpace(SearchSpace):
    """CAE family; the choice lists are arguments, so a smaller space (tests, budgets) is
    ``CAESpace(widths=(8, 16), depths=(2, 3))``."""

    name = "cae"
    task = "detection"

    def __init__(self, depths: Sequence[int] = (2, 3, 4), widths: Sequence[int] = (8, 16, 32, 64),
                 kernels: Sequence[int] = (3, 4, 5), latents: Sequence[int] = (16, 32, 64, 128),
                 latent_kinds: Sequence[str] = ("vector", "spatial"),
                 activations: Sequence[str] = ACTIVATIONS, refine: Sequence[int] = (0, 1),
                 skips: Sequence[bool] = (False, True)) -> None:
        for d in depths:
            if not 1 <= int(d) <= MAX_DEPTH:
                raise ConfigError(f"CAESpace.depths: expected values in 1..{MAX_DEPTH}, got {d}")
        for k in kernels:
            if k not in _PAD:
                raise ConfigError(f"CAESpace.kernels: expected 3, 4 or 5, got {k}")
        for a in activations:
            make_activation(a, 1)
        params: list[Param] = [Param("depth", tuple(int(d) for d in depths))]
        for i in range(max(int(d) for d in depths)):
            params.append(Param(f"width{i}", tuple(int(w) for w in widths), when=_active(i)))
            params.append(Param(f"kernel{i}", tuple(int(k) for k in kernels), when=_active(i)))
        params += [Param("refine", tuple(int(r) for r in refine)),
                   Param("skip", tuple(bool(s) for s in skips), when=lambda a: a["refine"] == 1),
                   Param("latent_kind", tuple(latent_kinds)),
                   Param("latent", tuple(int(v) for v in latents)),
                   Param("act", tuple(activations))]
        self.params = tuple(params)

    def build(self, arch: dict[str, Any], input_shape: Sequence[int],
              seed: int = 0) -> NASAutoencoder:
        arch = self.validate(arch)
        channels, side = int(input_shape[0]), int(input_shape[-1])
        depth = arch["depth"]
        if int(input_shape[-2]) != side or side % (2 ** depth) or side // 2 ** depth < 1:
            raise ConfigError(f"architecture.depth: {depth} stride-2 stages need a square input "
                              f"whose side is a multiple of {2 ** depth}, got "
                              f"{tuple(input_shape[-2:])}")
        widths = [arch[f"width{i}"] for i in range(depth)]
        kernels = [arch[f"kernel{i}"] for i in range(depth)]
        act, refine, skip = arch["act"], arch["refine"] == 1, bool(arch.get("skip", False))
        bottom = side // 2 ** depth
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            enc: list[nn.Module] = []
            c_in = channels
            for w, k in zip(widths, kernels, strict=True):
                enc += [nn.Conv2d(c_in, w, k, stride=2, padding=_PAD[k][0]),
                        make_activation(act, w)]
                enc += self._refine(w, act, refine, skip)
                c_in = w
            spatial = arch["latent_kind"] == "spatial"
            lk, lp = (3, 1) if spatial else (bottom, 0)
            enc.append(nn.Conv2d(c_in, arch["latent"], lk, padding=lp))  # linear bottleneck
            dec: list[nn.Module] = [nn.ConvTranspose2d(arch["latent"], c_in, lk, padding=lp),
                                    make_activation(act, c_in)]
            for i in range(depth - 1, -1, -1):
                w, k = widths[i], kernels[i]
                dec += self._refine(w, act, refine, skip)
                last = i == 0
                c_out = channels if last else widths[i - 1]
                pad, out_pad = _PAD[k]
                dec.append(nn.ConvTranspose2d(w, c_out, k, stride=2, padding=pad,
                                              output_padding=out_pad))
                dec.append(nn.Sigmoid() if last else make_activation(act, c_out))
            model = NASAutoencoder(nn.Sequential(*enc), nn.Sequential(*dec), arch)
            _init(model, act)
        return model

    @staticmethod
    def _refine(w: int, act: str, refine: bool, skip: bool) -> list[nn.Module]:
        if not refine:
            return []
        if skip:
            return [Residual(w, make_activation(act, w))]
        return [nn.Conv2d(w, w, 3, padding=1), make_activation(act, w)]

    def baseline(self, input_shape: Sequence[int], seed: int = 0) -> nn.Module:
        """The default CAE at this input size (width 1, latent 100, vector bottleneck)."""

        return build_cae(CAEConfig(input_size=int(input_shape[-1]),
                                   channels=int(input_shape[0]), seed=int(seed)))

    def baseline_name(self) -> str:
        return "default CAE"


def _init(model: nn.Module, act: str) -> None:
    """He-normal weights for the activation's slope, zero biases (current RNG); the fan of a
    stride-2 transposed convolution is divided by 4 (its output pixels see a quarter of the
    kernel), the fan of a transposed convolution from a 1x1 map is its input channels."""
    slope = 0.2 if act in ("leaky", "ranger") else 0.0
    gain = math.sqrt(2.0 / (1.0 + slope ** 2))
    for m in model.modules():
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            continue
        kh, kw = m.kernel_size
        fan = m.in_channels * kh * kw
        if isinstance(m, nn.ConvTranspose2d):
            fan = fan / (m.stride[0] * m.stride[1])
            if m.stride == (1, 1) and m.padding == (0, 0):
                fan = m.in_channels  # from the 1x1 vector bottleneck
        with torch.no_grad():
            m.weight.normal_(0.0, gain / math.sqrt(fan))
            if m.bias is not None:
                m.bias.zero_()
