"""Reader for datasets in the MVTec AD layout.

``ROOT/[category/]{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}``

Images (png/jpg/jpeg/bmp/tif/tiff, any case, any size, greyscale or colour) are resized to a
square ``size`` (bilinear, antialiased when shrinking): ``resize="stretch"`` (default) scales
each axis independently; ``resize="fit"`` keeps the aspect ratio (longer side = ``size``),
centres the image and fills the margin by repeating the edge pixels (masks: margin = 0).
Masks use nearest-neighbour and are binarised (``> 0`` -> 1); a mask with more than one
non-zero level (e.g. anti-aliased edges or a JPEG mask) is binarised the same way and a
``UserWarning`` names its folder and first such file, once per folder. Order is deterministic: train
files sorted by name; test folders ``good`` first, then defect types alphabetically, files
sorted by name within each folder.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from flipguard.errors import FlipguardError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESIZE_MODES = ("stretch", "fit")
_GREY_MODES = {"1", "L"}
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}  # 16-bit greyscale (TIFF/PNG)
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's "L"
_T = TypeVar("_T")
_R = TypeVar("_R")


class DatasetError(FlipguardError, ValueError):
    """A dataset folder or file that cannot be used; the one-line message names the path."""


@dataclass(repr=False)
class MVTecDataset:
    """Preprocessed images, labels and masks of one MVTec-layout dataset (category).

    ``train``/``test`` are float32 ``(N, C, H, W)`` in [0, 1]; ``test_labels`` int64 (0 = good,
    1 = defective); ``test_types`` the folder names; ``test_masks`` float32 ``(M, 1, H, W)`` in
    {0, 1} (all zero for good images) or ``None`` when the dataset has no ``ground_truth/``.
    """

    root: Path
    size: int
    channels: int
    train: torch.Tensor
    test: torch.Tensor
    test_labels: np.ndarray
    test_types: list[str]
    test_masks: torch.Tensor | None
    train_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    resize: str = "stretch"

    @property
    def defect_types(self) -> list[str]:
        """Defect folder names present in ``test/`` (sorted, without ``good``)."""
        return sorted({t for t in self.test_types if t != "good"})

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the preprocessed tensors, labels, types, size and channels.

        >>> ds.fingerprint()[:12]  # doctest: +SKIP
        '3f1c0a9b27de'
        """
        h = hashlib.sha256()
        h.update(f"size={self.size};channels={self.channels};".encode())
        if self.resize != "stretch":  # stretch runs keep their historical fingerprints
            h.update(f"resize={self.resize};".encode())
        for name, tensor in (("train", self.train), ("test", self.test)):
            arr = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
            h.update(f"{name}{arr.shape};".encode())
            h.update(arr.tobytes())
        h.update(np.ascontiguousarray(self.test_labels, dtype=np.int64).tobytes())
        h.update("\n".join(self.test_types).encode())
        if self.test_masks is None:
            h.update(b"masks=None")
        else:
            masks = self.test_masks.detach().cpu().numpy().astype(np.uint8)
            h.update(f"masks{masks.shape};".encode())
            h.update(np.packbits(masks).tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        masks = "None" if self.test_masks is None else "present"
        return (
            f"MVTecDataset(root={str(self.root)!r}, size={self.size}, channels={self.channels}, "
            f"train={len(self.train_paths)}, test={len(self.test_paths)}, "
            f"defect_types={self.defect_types}, masks={masks})"
        )


def load_mvtec(
    root: str | os.PathLike[str],
    category: str | None = None,
    size: int = 128,
    channels: int | None = None,
    resize: str = "stretch",
) -> MVTecDataset:
    """Load an MVTec-layout dataset, resized to ``size`` x ``size`` (``resize``: "stretch" or
    the aspect-preserving "fit", see the module docstring).

    ``channels=None`` infers: 1 if every image is greyscale, else 3 (a mix of greyscale and
    colour images is promoted to RGB). ``channels=1`` converts colour to luma; ``channels=3``
    replicates greyscale. Alpha channels are dropped, palettes expanded (all-grey palettes
    count as greyscale), 16-bit greyscale divided by 65535; 2-channel (LA) images are refused.
    Without ``ground_truth/`` a ``UserWarning`` is emitted and ``test_masks`` is ``None``.

    >>> ds = load_mvtec("data/magnetic_tile", size=64)  # doctest: +SKIP
    >>> ds.train.shape, ds.test_masks.shape             # doctest: +SKIP
    (torch.Size([665, 1, 64, 64]), torch.Size([679, 1, 64, 64]))
    """
    root = Path(root)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DatasetError(f"{root}: size={size!r} is invalid; expected a positive integer")
    size = int(size)
    if resize not in RESIZE_MODES:
        raise DatasetError(f"{root}: resize={resize!r} is invalid; expected 'stretch' or 'fit'")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DatasetError(
            f"{root}: channels={channels!r} cannot be produced; expected None (infer), 1 or 3"
        )
    base = _dataset_root(root, category)
    train_files = _list_images(base / "train" / "good", "train/good")
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: missing folder; expected test/<type>/ with test images")
    test_files: list[Path] = []
    test_types: list[str] = []
    for type_dir in _test_type_dirs(test_dir):
        files = _list_images(type_dir, f"test/{type_dir.name}")
        test_files += files
        test_types += [type_dir.name] * len(files)
    if not test_files:
        raise DatasetError(f"{test_dir}: no test images; expected test/<type>/ image folders")

    gt_dir = base / "ground_truth"
    has_gt = gt_dir.is_dir()
    mask_files: list[Path | None] = [None] * len(test_files)
    if has_gt:
        index: dict[str, dict[str, Path]] = {}
        for i, (path, kind) in enumerate(zip(test_files, test_types, strict=True)):
            if kind == "good":
                continue
            if kind not in index:
                index[kind] = _mask_index(gt_dir / kind)
            mask = index[kind].get(path.stem)
            if mask is None:
                expected = gt_dir / kind / f"{path.stem}_mask.png"
                raise DatasetError(f"{expected}: missing mask for defective test image {path}")
            mask_files[i] = mask
    else:
        warnings.warn(
            f"{base}: no ground_truth/ folder; pixel metrics are unavailable "
            "(image-level evaluation only)",
            UserWarning,
            stacklevel=2,
        )

    fit = resize == "fit"
    train_raw = _parallel_map(lambda p: _read_image(p, size, fit)[0], train_files)
    test_raw = _parallel_map(
        lambda pm: _read_test_pair(pm[0], pm[1], size, fit),
        list(zip(test_files, mask_files, strict=True)),
    )
    test_imgs = [img for img, _ in test_raw]
    if channels is None:
        channels = 1 if all(a.shape[-1] == 1 for a in train_raw + test_imgs) else 3
    train = _stack(train_raw, channels, size)
    test = _stack(test_imgs, channels, size)
    masks = None
    if has_gt:
        m = np.zeros((len(test_raw), 1, size, size), dtype=np.float32)
        for i, (_, mask) in enumerate(test_raw):
            if mask is not None:
                m[i, 0] = mask
        masks = torch.from_numpy(m)
    labels = np.array([0 if t == "good" else 1 for t in test_types], dtype=np.int64)
    return MVTecDataset(
        root=base,
        size=size,
        channels=channels,
        train=train,
        test=test,
        test_labels=labels,
        test_types=test_types,
        test_masks=masks,
        train_paths=[str(p) for p in train_files],
        test_paths=[str(p) for p in test_files],
        resize=resize,
    )


def split_validation(
    n: int, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` (the ``train/good`` images) into train and validation indices.

    Both arrays are sorted int64, disjoint and together cover ``range(n)``; the validation part
    has ``round(n * val_fraction)`` images, at least 1 when ``n >= 2`` and at most ``n - 1``.

    >>> split_validation(10, 0.2, seed=0)[1].size
    2
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DatasetError(f"split_validation: n={n!r} is invalid; expected an integer >= 0")
    if not 0.0 < float(val_fraction) < 1.0:
        raise DatasetError(
            f"split_validation: val_fraction={val_fraction!r} is invalid; expected 0 < value < 1"
        )
    n = int(n)
    n_val = min(max(1, round(n * float(val_fraction))), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def split_folds(n: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded partition of ``range(n)`` into ``folds`` disjoint sorted int64 index arrays
    whose sizes differ by at most one (cross-validation of the ``train/good`` images). Fold 0
    is exactly the validation part of ``split_validation(n, 1 / folds, seed)``, so its model
    is the one a plain training with that validation fraction gives.

    >>> [f.size for f in split_folds(10, 3, seed=0)]
    [3, 4, 3]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DatasetError(f"split_folds: n={n!r} is invalid; expected an integer >= 0")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise DatasetError(f"cv_folds: expected an integer >= 2 (got {folds!r})")
    if folds > n:
        raise DatasetError(f"cv_folds: {folds} folds need at least {folds} train/good images "
                           f"(found {n})")
    n_val = split_validation(n, 1.0 / int(folds), seed)[1].size
    perm = np.random.default_rng(seed).permutation(int(n))  # the permutation it splits
    parts = [perm[:n_val], *np.array_split(perm[n_val:], int(folds) - 1)]
    return [np.sort(part).astype(np.int64) for part in parts]


# --------------------------------------------------------------------------- layout helpers


def _dataset_root(root: Path, category: str | None) -> Path:
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root not found (expected a directory)")
    if category is not None:
        base = root / category
        if not base.is_dir():
            found = ", ".join(_categories(root)) or "none"
            raise DatasetError(f"{base}: category folder not found; categories in root: {found}")
        return base
    if not (root / "train").is_dir():
        cats = _categories(root)
        if cats:
            raise DatasetError(
                f"{root}: multi-category dataset (no train/ folder); pass category= one of: "
                + ", ".join(cats)
            )
    if not (root / "train" / "good").is_dir():
        raise DatasetError(
            f"{root / 'train' / 'good'}: missing folder; expected MVTec layout "
            "ROOT/train/good, ROOT/test/<type>, ROOT/ground_truth/<type>"
        )
    return root


def _categories(root: Path) -> list[str]:
    return sorted(
        d.name for d in root.iterdir() if not d.name.startswith(".") and (d / "train").is_dir()
    )


def _list_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing folder; expected {what} images")
    files = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
    if not files:
        exts = "/".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise DatasetError(f"{folder}: no images ({exts}) in {what}")
    return files


def _is_image_file(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _test_type_dirs(test_dir: Path) -> list[Path]:
    dirs = [d for d in test_dir.iterdir() if not d.name.startswith(".") and d.is_dir()]
    return sorted(dirs, key=lambda d: (d.name != "good", d.name))


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map image stem -> mask file ``<stem>_mask.<ext>`` (``.png`` preferred)."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    for p in sorted(folder.iterdir(), key=lambda p: (p.suffix.lower() != ".png", p.name)):
        if _is_image_file(p) and p.stem.lower().endswith("_mask"):
            index.setdefault(p.stem[: -len("_mask")], p)
    return index


# --------------------------------------------------------------------------- decoding


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """Order-preserving map; PIL releases the GIL while decoding and resizing."""
    workers = min(8, os.cpu_count() or 1, max(1, len(items) // 16))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read image ({_one_line(exc)})") from None


def _fit_geometry(orig: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Aspect-preserving placement of an image of PIL size ``(w, h)`` in a ``size`` square:
    ``(new_w, new_h, left, top)``."""
    w, h = orig
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    return nw, nh, (size - nw) // 2, (size - nh) // 2


def _place(arr: np.ndarray, size: int, left: int, top: int, mode: str) -> np.ndarray:
    """Pad an ``(h, w[, c])`` array to ``size`` x ``size`` at ``(left, top)``."""
    h, w = arr.shape[:2]
    pad = [(top, size - h - top), (left, size - w - left)] + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pad, mode=mode)  # type: ignore[call-overload]


def _read_image(
    path: Path, size: int, fit: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode, normalise mode and resize: float32 ``(size, size, 1 | 3)`` in [0, 1], orig size.

    Palette images whose colours are all grey count as greyscale; other palettes as RGB.
    """
    im = _open(path)
    orig, mode = im.size, im.mode
    nw, nh, left, top = _fit_geometry(orig, size) if fit else (size, size, 0, 0)
    if mode not in _GREY_MODES | _COLOUR_MODES | _WIDE_GREY_MODES | {"F"}:
        raise DatasetError(
            f"{path}: unsupported image with {len(im.getbands())} channels (mode {mode}); "
            "expected 1 (greyscale), 3 (RGB) or 4 (RGBA)"
        )
    try:
        if mode in _WIDE_GREY_MODES or mode == "F":
            arr = np.asarray(im, dtype=np.float32)
            if mode != "F":
                arr = arr / np.float32(65535.0)
            elif arr.size and float(np.nanmax(arr)) > 1.0:
                arr = arr / np.float32(255.0)
            arr = np.nan_to_num(np.clip(arr, 0.0, 1.0))
            f_im = Image.fromarray(arr.astype(np.float32), mode="F")
            out = np.asarray(f_im.resize((nw, nh), Image.Resampling.BILINEAR), np.float32)
        else:
            if mode not in ("L", "RGB"):
                im = im.convert("L" if mode == "1" else "RGB")
            out = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR), np.float32)
            out = out / np.float32(255.0)
            if mode in ("P", "PA") and _grey_palette(im):
                out = out[:, :, :1]
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot convert image mode {mode} ({_one_line(exc)})") from None
    if out.ndim == 2:
        out = out[:, :, None]
    if fit:
        out = _place(out, size, left, top, "edge")
    return np.clip(out, 0.0, 1.0), orig


def _grey_palette(rgb: Image.Image) -> bool:
    colours = rgb.getcolors(maxcolors=1 << 16) or []
    return all(c[1][0] == c[1][1] == c[1][2] for c in colours) and bool(colours)


_GRADED_WARNED: set[Path] = set()


def _warn_if_graded(path: Path, arr: np.ndarray) -> None:
    """Warn once per mask folder when a mask has several non-zero levels (binarised > 0)."""
    if path.parent in _GRADED_WARNED:
        return
    levels = np.unique(arr)
    if np.count_nonzero(levels) > 1:
        _GRADED_WARNED.add(path.parent)
        warnings.warn(f"{path}: mask is not binary ({levels.size} grey levels); every pixel > 0 "
                      f"counts as defective (first such mask in {path.parent})", stacklevel=2)


def _read_mask(
    path: Path, size: int, image_size: tuple[int, int], image: Path, fit: bool = False
) -> np.ndarray:
    im = _open(path)
    if im.size != image_size:
        raise DatasetError(
            f"{path}: mask size {im.size[0]}x{im.size[1]} differs from image {image} "
            f"size {image_size[0]}x{image_size[1]}"
        )
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    arr = np.asarray(im)
    if arr.ndim == 3:  # colour mask: any colour channel set (alpha ignored)
        arr = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        binary = (arr > 0).any(axis=-1)
    else:
        binary = arr > 0
    _warn_if_graded(path, arr)
    nw, nh, left, top = _fit_geometry(image_size, size) if fit else (size, size, 0, 0)
    small = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize(
        (nw, nh), Image.Resampling.NEAREST
    )
    out = (np.asarray(small) > 0).astype(np.float32)
    return _place(out, size, left, top, "constant") if fit else out


def _read_test_pair(
    path: Path, mask: Path | None, size: int, fit: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    img, orig = _read_image(path, size, fit)
    return img, (None if mask is None else _read_mask(mask, size, orig, path, fit))


def _stack(arrays: Iterable[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """``(H, W, 1|3)`` arrays -> float32 ``(N, channels, H, W)``; luma or replication as needed."""
    arrays = list(arrays)
    out = np.empty((len(arrays), channels, size, size), dtype=np.float32)
    for i, a in enumerate(arrays):
        if a.shape[-1] == channels:
            out[i] = a.transpose(2, 0, 1)
        elif channels == 1:
            out[i, 0] = a @ _LUMA
        else:
            out[i] = a[:, :, 0][None]
    return torch.from_numpy(np.clip(out, 0.0, 1.0))
