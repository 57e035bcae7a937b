"""Tiny test models: the sequential CAE, a CIFAR-style ResNet-20 (skip connections, fx
traceable) and a model with per-sample data-dependent control flow (not traceable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flipguard.models import CAEConfig, build_cae


def tiny_cae(size: int = 32, width: float = 0.25, latent: int = 8, seed: int = 0) -> nn.Module:
    """The sequential SSIM-AE family CAE, tiny (input ``size``, grey)."""
    return build_cae(CAEConfig(input_size=size, width=width, latent_dim=latent, seed=seed)).eval()


def smooth_images(n: int, size: int = 32, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (bilinear upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, max(2, size // 4), max(2, size // 4), generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).contiguous()


class _Block(nn.Module):
    """CIFAR ResNet basic block with the option-A (zero-padding) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad >= 0:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = x
        return F.relu(out + short)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages x 3 blocks, widths w, 2w, 4w) for ``classes`` outputs."""

    def __init__(self, width: int = 4, classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(_Block(c, c_out, 2 if stage > 0 and i == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


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
