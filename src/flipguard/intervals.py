"""Sound interval versions of the anomaly maps of :mod:`flipguard.ssim`: every function takes
an input ``x`` and an interval ``[lo, hi]`` holding the reconstruction, and returns an
interval holding the map of every reconstruction in it (real arithmetic; float rounding is
the caller's margin). Used to certify that a bounded change of a reconstruction cannot move
an image's score across the threshold.

>>> from flipguard.ssim import gms_map
>>> x = torch.rand(1, 1, 8, 8)
>>> lo, hi = gms_interval(x, x - 0.01, x + 0.01)
>>> bool((lo <= gms_map(x, x)).all() and (gms_map(x, x) <= hi).all())
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flipguard.ssim import C1, C2, GMS_C, _scales, _sep_filter, gaussian_blur

__all__ = ["Pair", "square", "mul", "div", "blur_interval", "ssim_interval",
           "gms_interval", "msgms_interval"]

Pair = tuple[torch.Tensor, torch.Tensor]


def square(lo: torch.Tensor, hi: torch.Tensor) -> Pair:
    """Interval of ``v * v`` for ``v`` in ``[lo, hi]``.

    >>> square(torch.tensor([-1.0]), torch.tensor([2.0]))
    (tensor([0.]), tensor([4.]))
    """
    a, b = lo * lo, hi * hi
    low = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(a), torch.minimum(a, b))
    return low, torch.maximum(a, b)


def mul(a: Pair, b: Pair) -> Pair:
    """Interval product.

    >>> mul((torch.tensor([-1.0]), torch.tensor([2.0])), (torch.tensor([3.0]), torch.tensor([4.0])))
    (tensor([-4.]), tensor([8.]))
    """
    c = torch.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
    return c.amin(0), c.amax(0)


def div(a: Pair, b: Pair) -> Pair:
    """Interval quotient; ``(-inf, inf)`` where the divisor interval contains 0.

    >>> div((torch.tensor([1.0]), torch.tensor([2.0])), (torch.tensor([2.0]), torch.tensor([4.0])))
    (tensor([0.2500]), tensor([1.]))
    """
    ok = (b[0] > 0) | (b[1] < 0)
    safe = (torch.where(ok, b[0], torch.ones_like(b[0])),
            torch.where(ok, b[1], torch.ones_like(b[1])))
    lo, hi = mul(a, (1.0 / safe[1], 1.0 / safe[0]))
    inf = torch.full_like(lo, math.inf)
    return torch.where(ok, lo, -inf), torch.where(ok, hi, inf)


def blur_interval(lo: torch.Tensor, hi: torch.Tensor, sigma: float) -> Pair:
    """:func:`flipguard.ssim.gaussian_blur` of an interval (non-negative weights: the bounds
    are blurred separately)."""
    return gaussian_blur(lo, sigma), gaussian_blur(hi, sigma)


def ssim_interval(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, window_size: int = 11,
                  sigma: float = 1.5, c1: float = C1, c2: float = C2) -> Pair:
    """Interval of :func:`flipguard.ssim.ssim_map` ``(x, y)`` over ``y`` in ``[lo, hi]``."""
    def filt(t: torch.Tensor) -> torch.Tensor:  # the SSIM window: non-negative weights
        return _sep_filter(t, window_size, sigma)

    def filt2(pair: Pair) -> Pair:
        return filt(pair[0]), filt(pair[1])

    mu_x, e_xx = filt(x), filt(x * x)
    mu_y = filt2((lo, hi))
    e_yy = filt2(square(lo, hi))
    e_xy = filt2(mul((x, x), (lo, hi)))
    mu_yy = square(*mu_y)
    mu_xy = mul((mu_x, mu_x), mu_y)
    var_x = e_xx - mu_x * mu_x
    var_y = (e_yy[0] - mu_yy[1], e_yy[1] - mu_yy[0])
    cov = (e_xy[0] - mu_xy[1], e_xy[1] - mu_xy[0])
    num = mul((2 * mu_xy[0] + c1, 2 * mu_xy[1] + c1), (2 * cov[0] + c2, 2 * cov[1] + c2))
    den = mul((mu_x * mu_x + mu_yy[0] + c1, mu_x * mu_x + mu_yy[1] + c1),
              (var_x + var_y[0] + c2, var_x + var_y[1] + c2))
    q_lo, q_hi = div(num, den)
    return q_lo.mean(1, keepdim=True), q_hi.mean(1, keepdim=True)


def _prewitt(t: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = F.pad(t, (1, 1, 1, 1), mode="replicate")
    h, w = t.shape[-2:]

    def sl(dy: int, dx: int) -> torch.Tensor:
        return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    s = -1.0 if signed else 1.0
    gx = (sl(-1, 1) + sl(0, 1) + sl(1, 1) + s * (sl(-1, -1) + sl(0, -1) + sl(1, -1))) / 3.0
    gy = (sl(1, -1) + sl(1, 0) + sl(1, 1) + s * (sl(-1, -1) + sl(-1, 0) + sl(-1, 1))) / 3.0
    return gx, gy


def _magnitude(lo: torch.Tensor, hi: torch.Tensor) -> Pair:
    c, r = (lo + hi) / 2, (hi - lo) / 2
    (gx, gy), (rx, ry) = _prewitt(c, True), _prewitt(r, False)
    sx, sy = square(gx - rx, gx + rx), square(gy - ry, gy + ry)
    return torch.sqrt(sx[0] + sy[0] + 1e-12), torch.sqrt(sx[1] + sy[1] + 1e-12)


def gms_interval(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, c: float = GMS_C) -> Pair:
    """Interval of :func:`flipguard.ssim.gms_map` ``(x, y)`` over ``y`` in ``[lo, hi]``:
    ``f(t) = (2 g t + c) / (g^2 + t^2 + c)`` is unimodal in ``t >= 0`` with its peak at
    ``t = g`` (where it is 1), so its range over ``[t_lo, t_hi]`` is exact."""
    g = _magnitude(x, x)[0]
    t_lo, t_hi = _magnitude(lo, hi)

    def f(t: torch.Tensor) -> torch.Tensor:
        return (2.0 * g * t + c) / (g * g + t * t + c)

    low = torch.minimum(f(t_lo), f(t_hi))
    high = f(torch.clamp(g, min=t_lo, max=t_hi))
    return low.mean(1, keepdim=True), high.mean(1, keepdim=True)


def msgms_interval(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scales: int = 4) -> Pair:
    """Interval of :func:`flipguard.ssim.msgms_map` ``(x, y)`` over ``y`` in ``[lo, hi]``
    (average pooling and bilinear upsampling have non-negative weights).

    >>> x = torch.rand(1, 1, 16, 16)
    >>> a, b = msgms_interval(x, x, x)
    >>> bool(torch.allclose(a, b, atol=1e-5))
    True
    """
    h, w = x.shape[-2:]
    n = _scales(h, w, scales)
    t_lo, t_hi = gms_interval(x, lo, hi)
    for _ in range(1, n):
        x, lo, hi = F.avg_pool2d(x, 2), F.avg_pool2d(lo, 2), F.avg_pool2d(hi, 2)
        a, b = gms_interval(x, lo, hi)
        t_lo = t_lo + F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)
        t_hi = t_hi + F.interpolate(b, size=(h, w), mode="bilinear", align_corners=False)
    return t_lo / n, t_hi / n

