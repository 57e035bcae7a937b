"""Synthetic anomalies pasted onto normal images, drawn from a seeded ``torch.Generator``.

Two uses, deliberately with *different* generators:

* :func:`corrupt_batch` — the training corruption of the inpainting objective (DRAEM-style,
  Zavrtanik et al., ICCV 2021, without the external texture set): random smooth-noise blobs
  and thin level-set curves, filled with another image of the batch, a constant, a brightness
  shift or a blur, blended with a random opacity. The autoencoder learns to map the corrupted
  image back to the clean one, i.e. to *repair* what is not normal.
* :func:`paste_validation_defects` — a validation signal from normal images only: straight
  scratches, random-walk cracks and elliptic pits (the shapes of ``flipguard synth``) darker or
  brighter by a multiple of the image's own contrast, with exact masks. Used to compare
  hyper-parameters without ever touching the test set.

Both are generic (no dataset-specific shapes or intensities) and work for 1 or 3 channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["corrupt_batch", "noise_masks", "paste_validation_defects"]


def _smooth_noise(h: int, w: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """(1, h, w) smooth noise: uniform noise on a grid of ``cells`` cells along the shorter
    side, bicubic-upsampled."""
    gh = max(2, round(cells * h / min(h, w)))
    gw = max(2, round(cells * w / min(h, w)))
    coarse = torch.rand(1, 1, gh, gw, generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]


def noise_masks(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Binary anomaly masks (n, 1, h, w): per image either blobs (smooth noise on a 2-8 cell
    grid above a random high level, 0.5-8 % of the area) or thin curves (a narrow band around
    a level set of 2-4 cell noise).

    Example:
        >>> m = noise_masks(4, 32, 32, torch.Generator().manual_seed(0))
        >>> m.shape, bool(((m == 0) | (m == 1)).all()), bool((m.flatten(1).sum(1) > 0).all())
        (torch.Size([4, 1, 32, 32]), True, True)
    """
    masks = torch.zeros(n, 1, h, w)
    for i in range(n):
        blobs = torch.rand(1, generator=gen).item() < 0.6
        cells = int(2 ** torch.randint(1, 4 if blobs else 3, (1,), generator=gen).item())
        noise = _smooth_noise(h, w, cells, gen)
        if blobs:  # the highest 0.5-8 % of the noise: 1 to a few blobs
            area = 0.005 + 0.075 * torch.rand(1, generator=gen).item()
            level = torch.quantile(noise.flatten(), 1.0 - area)
            masks[i] = (noise >= level).float()
        else:  # curves: |noise - level| small, one to three pixels wide
            level = 0.3 + 0.4 * torch.rand(1, generator=gen).item()
            band = 0.004 + 0.012 * torch.rand(1, generator=gen).item()
            masks[i] = ((noise - level).abs() < band).float()
        if masks[i].sum() == 0:  # degenerate draw: one small square
            cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(
                torch.randint(0, w, (1,), generator=gen))
            r = max(1, min(h, w) // 32)
            masks[i, :, max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1] = 1.0
    return masks


def corrupt_batch(
    x: torch.Tensor, gen: torch.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a random fraction ``p`` of the batch ``x`` (N, C, H, W) in [0, 1].

    Returns ``(corrupted, masks)``; untouched images are returned unchanged with an empty
    mask. Each corrupted image gets a :func:`noise_masks` region filled with one of: a random
    other image of the batch (flipped), a constant grey, the image shifted by +-0.1..0.4, or
    the image heavily blurred — blended with opacity U(0.3, 1).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y, m = corrupt_batch(torch.rand(6, 1, 32, 32), g, p=1.0)
        >>> y.shape, bool((y >= 0).all() and (y <= 1).all()), m.shape
        (torch.Size([6, 1, 32, 32]), True, torch.Size([6, 1, 32, 32]))
    """
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=gen) < p
    masks = torch.zeros(n, 1, h, w, dtype=x.dtype)
    k = int(chosen.sum())
    if k == 0:
        return x, masks
    masks[chosen] = noise_masks(k, h, w, gen).to(x.dtype)
    kind = torch.randint(0, 4, (n,), generator=gen)
    other = x[torch.randint(0, n, (n,), generator=gen)].flip(-1, -2)
    const = torch.rand(n, x.shape[1], 1, 1, generator=gen).to(x.dtype).expand_as(x)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (x + (sign * (0.1 + 0.3 * torch.rand(n, generator=gen))).view(-1, 1, 1, 1)).clamp(0, 1)
    blur = F.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)
    fills = torch.stack([other, const, shift, blur])  # (4, N, C, H, W)
    fill = fills[kind, torch.arange(n)]
    alpha = (0.3 + 0.7 * torch.rand(n, generator=gen)).to(x.dtype).view(-1, 1, 1, 1)
    a = alpha * masks
    return (x * (1 - a) + fill * a).clamp(0.0, 1.0), masks


def _walk_mask(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """One validation defect mask (h, w) bool: 0 = straight scratch, 1 = crack, 2 = pit."""
    from PIL import Image, ImageDraw

    s = min(h, w)
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    width = max(1, round(s / 64))
    c = np.array([rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)])
    if kind == 0:
        a, length = rng.uniform(0, math.pi), rng.uniform(0.2, 0.45) * s
        d = 0.5 * length * np.array([math.cos(a), math.sin(a)])
        draw.line([tuple(c - d), tuple(c + d)], fill=255, width=width)
    elif kind == 1:
        pts, p, head = [tuple(c)], c.copy(), rng.uniform(0, 2 * math.pi)
        for _ in range(10):
            head += rng.normal(0.0, 0.45)
            p = p + (s / 28.0) * np.array([math.cos(head), math.sin(head)])
            pts.append(tuple(p))
        draw.line(pts, fill=255, width=width, joint="curve")
    else:
        rx, ry = np.maximum(rng.uniform(0.02, 0.06, size=2) * s, 1.5)
        draw.ellipse([c[0] - rx, c[1] - ry, c[0] + rx, c[1] + ry], fill=255)
    return np.asarray(im) > 0


def paste_validation_defects(
    images: torch.Tensor, seed: int = 0, contrast: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Defective copies of normal ``images`` (N, C, H, W) for a test-free validation signal.

    Image ``i`` gets a scratch, a crack or a pit (cycling), darker or brighter by ``contrast``
    times the image's own standard deviation (at least 0.05). Returns ``(defective, masks)``.

    Example:
        >>> x = torch.full((3, 1, 32, 32), 0.5)
        >>> bad, m = paste_validation_defects(x, seed=0)
        >>> bool(((bad - x).abs().flatten(1).amax(1) > 0.04).all()), m.shape
        (True, torch.Size([3, 1, 32, 32]))
    """
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    out = images.clone()
    masks = torch.zeros(n, 1, h, w)
    for i in range(n):
        m = torch.from_numpy(_walk_mask(rng, h, w, i % 3))
        delta = max(0.05, contrast * float(images[i].std())) * (1 if rng.random() < 0.5 else -1)
        out[i] = torch.where(m, (images[i] + delta).clamp(0, 1), images[i])
        masks[i, 0] = m.float()
    return out, masks
