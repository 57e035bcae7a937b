"""A user's CIFAR-style ResNet-20 classifier, for ``flipguard init --task classification``.

``resnet20()`` is the factory flipguard imports (``--model examples/resnet20.py:resnet20``).
Run this file to make a small trained example: 8×8 handwritten digits (scikit-learn) upsampled
to 32×32 RGB, a few epochs of training, then ``OUT/weights.pt`` (a state dict) and
``OUT/digits.pt`` (``{"inputs", "labels"}`` of the held-out images)::

    python examples/resnet20.py --out runs/r20-example --epochs 3
    flipguard init runs/r20 --model examples/resnet20.py:resnet20 \\
        --weights runs/r20-example/weights.pt --data runs/r20-example/digits.pt \\
        --task classification
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Basic block with the option-A (zero-padding) shortcut of the CIFAR ResNets."""

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
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) \
            if self.pad >= 0 else x
        return F.relu(out + short)


class ResNet20(nn.Module):
    """3 stages × 3 blocks, widths w, 2w, 4w, global average pooling, linear head."""

    def __init__(self, width: int = 16, classes: int = 10, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(Block(c, c_out, 2 if stage > 0 and i == 0 else 1))
                c = c_out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet20(width: int = 16, classes: int = 10) -> nn.Module:
    """The factory: an untrained ResNet-20 (flipguard loads the weights into it)."""
    torch.manual_seed(0)
    return ResNet20(width, classes)


def digits32(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as 32×32 RGB images in [0, 1] with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm].contiguous(), torch.as_tensor(d.target)[perm]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--test", type=int, default=256, help="held-out images written")
    a = ap.parse_args(argv)
    x, y = digits32()
    xt, yt, xs, ys = x[a.test:], y[a.test:], x[:a.test], y[:a.test]
    net = resnet20(a.width)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(a.epochs):
        net.train()
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            F.cross_entropy(net(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xs).argmax(1) == ys).float().mean().item()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), a.out / "weights.pt")
    torch.save({"inputs": xs, "labels": ys}, a.out / "digits.pt")
    print(f"held-out accuracy {acc:.3f}; wrote {a.out}/weights.pt and {a.out}/digits.pt")


if __name__ == "__main__":
    main()
