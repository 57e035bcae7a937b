"""Reading the real Magnetic-Tile dataset unchanged (skips when it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from flipguard.data import load_mvtec, split_validation

SIZE = 32
COUNTS = {"good": 287, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}


def _nearest(a: np.ndarray, s: int) -> np.ndarray:
    """Independent nearest-neighbour oracle (sample source at output pixel centres)."""
    h, w = a.shape
    iy = np.floor((np.arange(s) + 0.5) * h / s).astype(int)
    ix = np.floor((np.arange(s) + 0.5) * w / s).astype(int)
    return a[iy][:, ix]


def test_magnetic_tile_loads_unchanged(magnetic_tile: Path) -> None:
    ds = load_mvtec(magnetic_tile, size=SIZE)
    assert ds.channels == 1
    assert tuple(ds.train.shape) == (665, 1, SIZE, SIZE)
    assert tuple(ds.test.shape) == (679, 1, SIZE, SIZE)
    assert {t: ds.test_types.count(t) for t in COUNTS} == COUNTS
    assert ds.defect_types == sorted(k for k in COUNTS if k != "good")
    np.testing.assert_array_equal(ds.test_labels, [t != "good" for t in ds.test_types])
    assert ds.test_labels.sum() == 679 - 287
    for x in (ds.train, ds.test):
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.02
    assert [Path(p).name for p in ds.train_paths] == sorted(
        p.name for p in (magnetic_tile / "train" / "good").glob("*.jpg")
    )
    for path, kind in zip(ds.test_paths, ds.test_types, strict=True):
        assert Path(path).parent.name == kind

    masks = ds.test_masks
    assert masks is not None and tuple(masks.shape) == (679, 1, SIZE, SIZE)
    m = masks.numpy()[:, 0]
    assert set(np.unique(m)) == {0.0, 1.0}
    area = m.reshape(len(m), -1).sum(1)
    defect = ds.test_labels == 1
    assert area[~defect].sum() == 0
    # tiny defects can vanish under nearest resizing at 32 px, but nearly all survive
    assert (area[defect] > 0).mean() > 0.9
    for kind in ds.defect_types:
        assert (area[np.array(ds.test_types) == kind] > 0).any(), kind

    # masks match an independent nearest-neighbour resize of the source mask files
    for i in np.flatnonzero(defect)[::40]:
        img = Path(ds.test_paths[i])
        src = magnetic_tile / "ground_truth" / img.parent.name / f"{img.stem}_mask.png"
        with Image.open(src) as im:
            ref = _nearest(np.asarray(im) > 0, SIZE)
        np.testing.assert_array_equal(m[i], ref.astype(np.float32))

    tr, val = split_validation(len(ds.train), val_fraction=0.1, seed=0)
    assert val.size == 66 and tr.size == 599


def test_magnetic_tile_fit_resize_keeps_every_aspect_ratio(magnetic_tile: Path) -> None:
    ds = load_mvtec(magnetic_tile, size=SIZE, resize="fit")
    assert tuple(ds.test.shape) == (679, 1, SIZE, SIZE) and ds.resize == "fit"
    m = ds.test_masks.numpy()[:, 0]
    for i in range(0, 679, 29):
        with Image.open(ds.test_paths[i]) as im:
            w, h = im.size
        nw, nh = round(w * SIZE / max(w, h)), round(h * SIZE / max(w, h))
        top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
        x = ds.test[i, 0].numpy()
        # margins repeat the nearest image row/column; masks are empty there
        if top:
            np.testing.assert_array_equal(x[:top], np.repeat(x[top : top + 1], top, 0))
            assert m[i, :top].sum() == 0 and m[i, top + nh :].sum() == 0
        if left:
            np.testing.assert_array_equal(x[:, :left], np.repeat(x[:, left : left + 1], left, 1))
            assert m[i, :, :left].sum() == 0 and m[i, :, left + nw :].sum() == 0
