"""Synthetic defects with exact masks pasted onto given normal images.

The shapes are those of the synthetic dataset generator (:mod:`flipguard.data.synth`:
straight ``scratch`` es, random-walk ``crack`` s, elliptic ``blob`` s, drawn by the same
functions); the intensity shift keeps the generator's sign and is scaled to the image's own
contrast (``strength`` x its standard deviation, at least ``min_shift``) so that the defects
are neither trivial nor invisible on real surfaces. The mask marks exactly the pixels whose
value changed (pixels where clipping to [0, 1] cancelled the shift are not marked; if it
cancels every pixel, the shift is reversed). Used to judge a detector on validation data
without test labels (``flipguard nas``).

>>> import torch
>>> x = torch.full((3, 1, 32, 32), 0.5)
>>> bad, masks, kinds = paste_defects(x, seed=0)
>>> kinds
['scratch', 'crack', 'blob']
>>> bool(((bad - x).abs().sum(1, keepdim=True) > 0).eq(masks > 0).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from flipguard.data.synth import DEFECT_DRAWERS, DEFECT_TYPES
from flipguard.errors import ConfigError

__all__ = ["paste_defects"]


def paste_defects(images: Tensor, seed: int = 0, kinds: Sequence[str] = DEFECT_TYPES,
                  strength: float = 2.0, min_shift: float = 0.05
                  ) -> tuple[Tensor, Tensor, list[str]]:
    """Defective copies of ``images`` (N, C, H, W) in [0, 1]: image ``i`` gets a defect of
    kind ``kinds[i % len(kinds)]`` drawn from ``default_rng([seed, i])`` (so image ``i``'s
    defect does not depend on the others). Returns ``(defective, masks, kinds)``; ``masks``
    is (N, 1, H, W) in {0, 1}, exactly the changed pixels."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ConfigError(f"images: expected a non-empty (N, C, H, W) tensor, got shape "
                          f"{tuple(images.shape)}")
    bad = [k for k in kinds if k not in DEFECT_DRAWERS]
    if bad or not kinds:
        raise ConfigError(f"kinds: expected items of {', '.join(DEFECT_TYPES)}, got "
                          f"{bad[0] if bad else 'nothing'!r}")
    if not strength > 0 or not min_shift >= 0:
        raise ConfigError(f"strength/min_shift: expected strength > 0 and min_shift >= 0, got "
                          f"{strength}, {min_shift}")
    n, _, h, w = images.shape
    side = max(h, w)
    x = images.detach().to(torch.float64).cpu().numpy()
    out = x.copy()
    masks = np.zeros((n, 1, h, w), dtype=np.float32)
    names: list[str] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        rng = np.random.default_rng([int(seed), i])
        for _ in range(16):  # redraw the (rare) shape cropped away on a non-square image
            shape, delta = DEFECT_DRAWERS[kind](rng, side)
            shape = shape[:h, :w]
            if shape.any():
                break
        shift = np.sign(delta) * max(min_shift, strength * float(x[i].std()))
        for sign in (1.0, -1.0):
            new = np.where(shape, np.clip(x[i] + sign * shift, 0.0, 1.0), x[i])
            changed = (new != x[i]).any(axis=0)
            if changed.any():
                break
        out[i], masks[i, 0] = new, changed
        names.append(kind)
    return (torch.from_numpy(out).to(images.dtype), torch.from_numpy(masks), names)
