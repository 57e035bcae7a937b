"""A user's own convolutional autoencoder, for ``flipguard init --task detection``.

``user_ae()`` is the factory (``--model examples/user_ae.py:user_ae``): a small plain
autoencoder with strided convolutions, a 1×1 bottleneck convolution and transposed
convolutions — not flipguard's CAE. Run this file to train it for a few epochs on an
MVTec-layout root (its ``train/good`` images, greyscale, resized to 64×64) and write
``OUT/weights.pt``::

    flipguard synth runs/synth-data --size 64
    python examples/user_ae.py --data runs/synth-data --out runs/ae-example --epochs 10
    flipguard init runs/ae --model examples/user_ae.py:user_ae \\
        --weights runs/ae-example/weights.pt --data runs/synth-data --size 64 --task detection
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def user_ae(channels: int = 1, width: int = 16) -> nn.Module:
    """The factory: an untrained autoencoder for 64×64 (any multiple of 8) images."""
    torch.manual_seed(0)
    w = width
    return nn.Sequential(
        nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * w, w, 1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Sigmoid(),
    )


def good_images(root: Path, size: int = 64) -> torch.Tensor:
    """``root/train/good`` as greyscale (N, 1, size, size) in [0, 1]."""
    files = sorted(p for p in (root / "train" / "good").iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    arr = [np.asarray(Image.open(f).convert("L").resize((size, size), Image.BILINEAR),
                      dtype=np.float32) / 255.0 for f in files]
    return torch.as_tensor(np.stack(arr)).unsqueeze(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args(argv)
    x = good_images(a.data, a.size)
    net = user_ae()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(a.epochs):
        for i in range(0, len(x), 16):
            opt.zero_grad()
            loss = F.mse_loss(net(x[i:i + 16]), x[i:i + 16])
            loss.backward()
            opt.step()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save(net.eval().state_dict(), a.out / "weights.pt")
    print(f"final loss {loss.item():.5f}; wrote {a.out}/weights.pt")


if __name__ == "__main__":
    main()
