"""Procedural synthetic surface-defect dataset in the MVTec AD layout.

Normal images are textured surfaces (smooth low-frequency shading + brushed-metal streaks +
a faint woven grid + sensor noise), randomised per image but drawn from one distribution.
Defects (``scratch``, ``crack``, ``blob``) shift the surface intensity inside an exact binary
mask, so ``ground_truth/<type>/<stem>_mask.png`` marks precisely the changed pixels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from flipguard.data.mvtec import DatasetError

DEFECT_TYPES = ("scratch", "crack", "blob")
_SPLIT_IDS = {"train": 1, "test": 2}


def make_synthetic(
    out_dir: str | os.PathLike[str],
    n_train: int = 60,
    n_test: int = 40,
    size: int = 128,
    seed: int = 0,
    defect_fraction: float = 0.5,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic surface dataset (MVTec layout, greyscale PNG) and return its path.

    ``round(n_test * defect_fraction)`` test images are defective, spread evenly over
    ``scratch``/``crack``/``blob`` (``test/<type>/NNN.png`` with masks in
    ``ground_truth/<type>/NNN_mask.png``); the rest go to ``test/good``. Same arguments give
    byte-identical files. The tree is built in a temporary sibling folder and renamed into
    place; a non-empty ``out_dir`` is refused unless ``overwrite=True``.

    >>> root = make_synthetic("/tmp/synth", n_train=8, n_test=6, size=32)  # doctest: +SKIP
    >>> sorted(p.name for p in (root / "test").iterdir())                  # doctest: +SKIP
    ['blob', 'crack', 'good', 'scratch']
    """
    out = Path(out_dir)
    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 1)
    _check_int("size", size, 8)
    _check_int("seed", seed, 0)
    if not 0.0 <= float(defect_fraction) <= 1.0:
        raise DatasetError(
            f"{out}: defect_fraction={defect_fraction!r} is invalid; expected 0 <= value <= 1"
        )
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(
            f"{out}: directory exists and is not empty; pass overwrite=True to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _generate(tmp, n_train, n_test, size, seed, float(defect_fraction))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DatasetError(
            f"make_synthetic: {name}={value!r} is invalid; expected int >= {minimum}"
        )


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished tree ``src`` to ``dst``; an existing ``dst`` is swapped out first."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / "d")
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / "d", dst)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _generate(root: Path, n_train: int, n_test: int, size: int, seed: int, frac: float) -> None:
    n_defect = round(n_test * frac)
    kinds = ["good"] * (n_test - n_defect)
    kinds += [DEFECT_TYPES[i % len(DEFECT_TYPES)] for i in range(n_defect)]
    counts = {k: kinds.count(k) for k in ("good", *DEFECT_TYPES)}
    folders = [("train", "good")] + [("test", k) for k, c in counts.items() if c]
    folders += [("ground_truth", k) for k in DEFECT_TYPES if counts[k]]
    for split, kind in folders:
        (root / split / kind).mkdir(parents=True)
    (root / "ground_truth").mkdir(exist_ok=True)

    for i in range(n_train):
        img = _surface(_rng(seed, "train", i), size)
        _save_png(img, root / "train" / "good" / f"{i:03d}.png")
    per_kind = dict.fromkeys(counts, 0)
    for i, kind in enumerate(kinds):
        rng = _rng(seed, "test", i)
        img = _surface(rng, size)
        stem = f"{per_kind[kind]:03d}"
        per_kind[kind] += 1
        if kind != "good":
            mask, delta = DEFECT_DRAWERS[kind](rng, size)
            img = np.where(mask, np.clip(img + delta, 0.0, 1.0), img)
            _save_png(mask.astype(np.float64), root / "ground_truth" / kind / f"{stem}_mask.png")
        _save_png(img, root / "test" / kind / f"{stem}.png")
    meta = {
        "generator": "flipguard.data.make_synthetic",
        "n_train": n_train,
        "n_test": n_test,
        "size": size,
        "seed": seed,
        "defect_fraction": frac,
        "counts": counts,
    }
    (root / "synthetic.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per image, so every image depends only on (seed, split, index)."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _save_png(img: np.ndarray, path: Path) -> None:
    arr = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path, format="PNG")


# --------------------------------------------------------------------------- surfaces


def _surface(rng: np.random.Generator, s: int) -> np.ndarray:
    """One normal surface in [0, 1]: shading + brushed streaks + weave + noise (std ~0.05)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    base = rng.uniform(0.44, 0.56)
    low = gaussian_filter(rng.standard_normal((s, s)), sigma=s / 8.0, mode="wrap")
    low *= rng.uniform(0.025, 0.045) / (low.std() + 1e-12)
    # brushed metal: 1-D noise profile smeared along a near-horizontal direction
    profile = gaussian_filter(rng.standard_normal(2 * s), sigma=0.8, mode="wrap")
    profile *= rng.uniform(0.015, 0.03) / (profile.std() + 1e-12)
    slope = np.tan(np.deg2rad(rng.uniform(-6.0, 6.0)))
    coord = np.mod(yy + slope * xx, 2 * s)
    streaks = np.interp(coord, np.arange(2 * s), profile, period=2 * s)
    # woven grid: fixed period (~8 px at 128) with per-image phase and slight jitter
    period = max(3.0, s / 16.0) * rng.uniform(0.92, 1.08)
    phase = rng.uniform(0.0, 2 * np.pi, size=2)
    weave = np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
    weave *= rng.uniform(0.012, 0.022)
    noise = rng.normal(0.0, 0.008, size=(s, s))
    return np.clip(base + low + streaks + weave + noise, 0.0, 1.0)


# --------------------------------------------------------------------------- defects


def _canvas(s: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (s, s), 0)
    return im, ImageDraw.Draw(im)


def _finish(im: Image.Image) -> np.ndarray:
    return np.asarray(im) > 0


def _line_width(s: int) -> int:
    return max(1, round(s / 64))


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _scratch(rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """1-2 thin straight segments (bright or dark), 25-50 % of the image side long."""
    im, draw = _canvas(s)
    angle = rng.uniform(0.0, np.pi)
    centre = rng.uniform(0.3 * s, 0.7 * s, size=2)
    for k in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.25, 0.5) * s * (1.0 if k == 0 else 0.6)
        a = angle + rng.normal(0.0, 0.05)
        c = centre + k * rng.uniform(2.0, 0.08 * s + 2.0) * np.array([-np.sin(a), np.cos(a)])
        d = 0.5 * length * np.array([np.cos(a), np.sin(a)])
        p0, p1 = np.clip(c - d, 0, s - 1), np.clip(c + d, 0, s - 1)
        draw.line([tuple(p0), tuple(p1)], fill=255, width=_line_width(s))
    return _finish(im), _sign(rng) * rng.uniform(0.3, 0.4)


def _crack(rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """Dark random-walk polyline with persistent direction (and sometimes one branch)."""
    im, draw = _canvas(s)
    width = _line_width(s)

    def walk(start: np.ndarray, heading: float, steps: int) -> list[tuple[float, float]]:
        pts = [tuple(start)]
        p = start.copy()
        for _ in range(steps):
            heading += rng.normal(0.0, 0.45)
            p = np.clip(p + (s / 28.0) * np.array([np.cos(heading), np.sin(heading)]), 0, s - 1)
            pts.append(tuple(p))
        return pts

    main = walk(rng.uniform(0.3 * s, 0.7 * s, size=2), rng.uniform(0, 2 * np.pi), 12)
    draw.line(main, fill=255, width=width, joint="curve")
    if rng.random() < 0.5:
        start = np.array(main[int(rng.integers(3, len(main) - 2))])
        branch = walk(start, rng.uniform(0, 2 * np.pi), 5)
        draw.line(branch, fill=255, width=width, joint="curve")
    return _finish(im), -rng.uniform(0.3, 0.4)


def _blob(rng: np.random.Generator, s: int) -> tuple[np.ndarray, float]:
    """Filled rotated ellipse (dark pit or bright spot), radii 4-10 % of the image side."""
    im, draw = _canvas(s)
    rx, ry = np.maximum(rng.uniform(0.04, 0.1, size=2) * s, 1.5)
    theta = rng.uniform(0.0, np.pi)
    c = rng.uniform(0.25 * s, 0.75 * s, size=2)
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    ex, ey = rx * np.cos(t), ry * np.sin(t)
    px = c[0] + ex * np.cos(theta) - ey * np.sin(theta)
    py = c[1] + ex * np.sin(theta) + ey * np.cos(theta)
    draw.polygon(list(zip(px.tolist(), py.tolist(), strict=True)), fill=255)
    return _finish(im), _sign(rng) * rng.uniform(0.25, 0.4)


DEFECT_DRAWERS: dict[str, Callable[[np.random.Generator, int], tuple[np.ndarray, float]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "blob": _blob,
}
