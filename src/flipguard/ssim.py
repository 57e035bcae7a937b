"""Differentiable SSIM (Wang et al., 2004) with a Gaussian window, shared by training and scoring.

Local statistics are Gaussian-weighted means computed with a separable depthwise convolution
(written as two banded matrix products, which is faster on CPU and batch-size invariant).
Borders use *replicate* padding (edge pixels repeated, scipy.ndimage ``mode="nearest"``) of
``window_size // 2`` pixels, so the SSIM map has the input's height and width for any image
size. All operations are plain tensor ops: NaN/Inf inputs propagate, any device works.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "gaussian_blur", "ssim_map", "ssim", "gms_map", "msgms_map",
           "msgms_input_side", "ssim_input_side"]

C1 = 0.01**2  # (K1 * L)^2 with L = 1 (data range [0, 1])
C2 = 0.03**2  # (K2 * L)^2


def gaussian_kernel1d(
    size: int,
    sigma: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length ``size`` (sums to 1).

    Example:
        >>> gaussian_kernel1d(3, 1.0).sum().item()
        1.0
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window size: expected a positive odd integer (got {size})")
    if not sigma > 0:
        raise ValueError(f"sigma: expected > 0 (got {sigma})")
    r = size // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float, size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of every channel of ``x`` (N, C, H, W), replicate padding.

    ``size`` defaults to ``2 * ceil(4 * sigma) + 1`` (scipy's ``truncate=4``).

    Example:
        >>> gaussian_blur(torch.ones(1, 1, 8, 8), sigma=2.0).allclose(torch.ones(1, 1, 8, 8))
        True
    """
    if size is None:
        size = 2 * math.ceil(4.0 * sigma) + 1
    return _sep_filter(x, size, sigma)


@functools.lru_cache(maxsize=32)
def _band_matrix(n: int, size: int, sigma: float) -> torch.Tensor:
    """(n, n) float64 matrix M with ``M @ v`` = 1-D Gaussian correlation of ``v`` with
    replicate padding of ``size // 2`` samples folded in."""
    k = gaussian_kernel1d(size, sigma, dtype=torch.float64)
    r = size // 2
    idx = (torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]).clamp_(0, n - 1)
    return torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, idx, k.expand(n, -1))


def _sep_filter(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Depthwise separable Gaussian correlation, 'same' size, replicate padding.

    Written as two banded matrix products ``Mh @ x @ Mw^T`` (the same linear map as a padded
    depthwise convolution): faster than ``conv2d`` on CPU and independent of the batch size.
    """
    h, w = x.shape[-2:]
    mh = _band_matrix(h, size, sigma).to(dtype=x.dtype, device=x.device)
    mw = mh if w == h else _band_matrix(w, size, sigma).to(dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = C1,
    c2: float = C2,
    x_side: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-pixel SSIM of ``x`` and ``y`` (N, C, H, W), averaged over channels -> (N, 1, H, W).

    Values lie in [-1, 1]; 1 means locally identical. ``x_side``: ``ssim_input_side(x,
    window_size, sigma)``, the local mean and second moment of ``x``, computed once for many
    ``y`` (bit-identical map).

    Example:
        >>> x = torch.rand(2, 3, 16, 16)
        >>> ssim_map(x, x).shape, bool(ssim_map(x, x).allclose(torch.ones(1)))
        (torch.Size([2, 1, 16, 16]), True)
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim_map: expected two (N, C, H, W) tensors of equal shape "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")
    gaussian_kernel1d(window_size, sigma)  # validates the window
    c = x.shape[1]
    if x_side is None:
        stats = _sep_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window_size, sigma)
        mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    else:
        mu_x, e_xx = x_side
        if mu_x.shape != x.shape or e_xx.shape != x.shape:
            raise ValueError("ssim_map: x_side does not match x (expected ssim_input_side(x))")
        stats = _sep_filter(torch.cat([y, y * y, x * y], dim=1), window_size, sigma)
        mu_y, e_yy, e_xy = stats.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return (num / den).mean(dim=1, keepdim=True)


def ssim_input_side(x: torch.Tensor, window_size: int = 11, sigma: float = 1.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of :func:`ssim_map` that depend on ``x`` alone: its Gaussian-weighted local
    mean and second moment, for ``ssim_map(x, y, x_side=...)``.

    Example:
        >>> x, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
        >>> bool(ssim_map(x, y, x_side=ssim_input_side(x)).equal(ssim_map(x, y)))
        True
    """
    gaussian_kernel1d(window_size, sigma)  # validates the window
    c = x.shape[1]
    mu_x, e_xx = _sep_filter(torch.cat([x, x * x], dim=1), window_size, sigma).split(c, dim=1)
    return mu_x, e_xx


def ssim(x: torch.Tensor, y: torch.Tensor, **kwargs: float) -> torch.Tensor:
    """Mean SSIM over all pixels and images (scalar tensor); ``kwargs`` go to :func:`ssim_map`.

    Example:
        >>> x = torch.rand(1, 1, 16, 16)
        >>> round(ssim(x, x).item(), 6)
        1.0
    """
    return ssim_map(x, y, **kwargs).mean()  # type: ignore[arg-type]


GMS_C = 0.0026  # stability constant of RIAD's GMS (Zavrtanik et al., 2021) for data in [0, 1]


def _prewitt_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude with 3x3 Prewitt filters (replicate padding), per channel.

    Written with shifted slices instead of ``conv2d`` so every image's result is independent
    of the batch size (elementwise arithmetic only)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]

    def sl(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (sl(-1, 1) + sl(0, 1) + sl(1, 1) - sl(-1, -1) - sl(0, -1) - sl(1, -1)) / 3.0
    gy = (sl(1, -1) + sl(1, 0) + sl(1, 1) - sl(-1, -1) - sl(-1, 0) - sl(-1, 1)) / 3.0
    return torch.sqrt(gx * gx + gy * gy + 1e-12)


def gms_map(x: torch.Tensor, y: torch.Tensor, c: float = GMS_C) -> torch.Tensor:
    """Gradient magnitude similarity ``(2 g_x g_y + c) / (g_x^2 + g_y^2 + c)`` of two
    (N, C, H, W) tensors, averaged over channels -> (N, 1, H, W); 1 = identical edges.

    Example:
        >>> x = torch.rand(2, 1, 16, 16)
        >>> bool(gms_map(x, x).allclose(torch.ones(1))), gms_map(x, x).shape
        (True, torch.Size([2, 1, 16, 16]))
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"gms_map: expected two (N, C, H, W) tensors of equal shape "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")
    return _gms(_prewitt_magnitude(x), _prewitt_magnitude(y), c)


def _gms(gx: torch.Tensor, gy: torch.Tensor, c: float = GMS_C) -> torch.Tensor:
    return ((2.0 * gx * gy + c) / (gx * gx + gy * gy + c)).mean(dim=1, keepdim=True)


def _scales(h: int, w: int, scales: int) -> int:
    return max(1, min(scales, 1 + int(math.log2(max(1, min(h, w))))))  # stop at 1-pixel scales


def msgms_input_side(x: torch.Tensor, scales: int = 4) -> list[torch.Tensor]:
    """The terms of :func:`msgms_map` that depend on ``x`` alone: its gradient magnitude at
    each scale. Pass them as ``msgms_map(x, y, x_side=...)`` to score many ``y`` against one
    ``x`` (a campaign's faulty reconstructions of the same inputs) without recomputing them;
    the map is bit-identical.

    Example:
        >>> x, y = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
        >>> bool(msgms_map(x, y, x_side=msgms_input_side(x)).equal(msgms_map(x, y)))
        True
    """
    n = _scales(*x.shape[-2:], scales)
    side = [_prewitt_magnitude(x)]
    for _ in range(1, n):
        x = F.avg_pool2d(x, 2)
        side.append(_prewitt_magnitude(x))
    return side


def msgms_map(x: torch.Tensor, y: torch.Tensor, scales: int = 4,
              x_side: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Multi-scale GMS (RIAD): the mean of :func:`gms_map` at ``scales`` dyadic scales
    (2x2 average pooling between scales), each bilinearly upsampled to the input size.
    ``x_side``: ``msgms_input_side(x, scales)``, computed once for many ``y``.

    Example:
        >>> x = torch.rand(1, 1, 32, 32)
        >>> y = x.clone(); y[..., 10:14, 10:14] = 0.0
        >>> m = msgms_map(x, y)
        >>> m.shape, bool(m[0, 0, 12, 12] < m[0, 0, 28, 28])
        (torch.Size([1, 1, 32, 32]), True)
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"msgms_map: expected two (N, C, H, W) tensors of equal shape "
                         f"(got {tuple(x.shape)} and {tuple(y.shape)})")
    h, w = x.shape[-2:]
    if x_side is None:
        gx = msgms_input_side(x, scales)
    elif len(x_side) != _scales(h, w, scales) or any(g.shape[:2] != x.shape[:2] for g in x_side):
        raise ValueError("msgms_map: x_side does not match x (expected msgms_input_side(x))")
    else:
        gx = x_side
    total = _gms(gx[0], _prewitt_magnitude(y))
    for g in gx[1:]:
        y = F.avg_pool2d(y, 2)
        up = F.interpolate(_gms(g, _prewitt_magnitude(y)), size=(h, w), mode="bilinear",
                           align_corners=False)
        total = total + up
    return total / len(gx)
