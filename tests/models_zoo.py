"""Tiny test models: the sequential CAE, a CIFAR-style ResNet-20 (skip connections, fx
traceable) and a model with per-sample data-dependent control flow (not traceable)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flipguard.models import CAEConfig, build_cae

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_cae(size: int = 32, width: float = 0.25, latent: int = 8, seed: int = 0) -> nn.Module:
    """The sequential SSIM-AE family CAE, tiny (input ``size``, grey)."""
    return build_cae(CAEConfig(input_size=size, width=width, latent_dim=latent, seed=seed)).eval()


def smooth_images(n: int, size: int = 32, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (bilinear upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, max(2, size // 4), max(2, size // 4), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous()


def example(name: str):
    """The module ``examples/<name>.py`` (the user-model examples of the README tour)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"flipguard_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ResNet20 = example("resnet20").ResNet20
"""CIFAR ResNet-20 (3 stages x 3 blocks, widths w, 2w, 4w): the README example's class."""


def resnet20(width: int = 4, classes: int = 10, seed: int = 0) -> nn.Module:
    """Seeded small ResNet-20 in eval mode with non-trivial BatchNorm statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResNet20(width, classes)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


class Gated(nn.Module):
    """Per-sample data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.up = nn.Conv2d(4, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        outs = []
        for i in range(h.shape[0]):
            hi = h[i : i + 1]
            outs.append(self.up(hi) if hi.mean() > 0.1 else -self.down(hi))
        h = torch.cat(outs)
        return self.head(h.mean(dim=(2, 3)))


class InPlaceNet(nn.Module):
    """Traceable model whose in-place ops change values that are live across layer cuts."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.conv3 = nn.Conv2d(4, 2, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        s = self.conv2(h)
        h.mul_(0.5)  # h is live at the cut before conv2 (and cached there)
        s = self.act(s)
        return self.conv3(h + s).flatten(1)


class Specialised(nn.Module):
    """Traceable, but the traced graph differs from ``forward`` (trace-time branch)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if isinstance(y, torch.fx.Proxy):
            y = y * 2.0
        return self.fc(y.mean(dim=(2, 3)))
