"""Synthetic surface-defect generator: determinism, layout, masks vs defects, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, median_filter
from sklearn.metrics import roc_auc_score

from flipguard.data import DEFECT_TYPES, DatasetError, load_mvtec, make_synthetic


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        return np.asarray(im).astype(np.float64) / 255.0


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", n_train=4, n_test=9, size=24, seed=5)
    b = make_synthetic(tmp_path / "b", n_train=4, n_test=9, size=24, seed=5)
    c = make_synthetic(tmp_path / "c", n_train=4, n_test=9, size=24, seed=6)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb and len(fa) > 10
    differing = [k for k in fa if k.endswith(".png") and fa[k] != fc.get(k)]
    assert len(differing) == sum(k.endswith(".png") for k in fa)


def test_layout_counts_and_metadata(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", n_train=5, n_test=11, size=16, seed=1)
    assert root == tmp_path / "s"
    assert len(list((root / "train" / "good").glob("*.png"))) == 5
    n_defect = round(11 * 0.5)  # 6 -> 2 per type
    assert len(list((root / "test" / "good").glob("*.png"))) == 11 - n_defect
    for kind in DEFECT_TYPES:
        imgs = sorted(p.stem for p in (root / "test" / kind).glob("*.png"))
        masks = sorted(p.stem for p in (root / "ground_truth" / kind).glob("*.png"))
        assert imgs == ["000", "001"] and masks == [f"{s}_mask" for s in imgs]
    for p in root.rglob("*.png"):
        assert _png(p).shape == (16, 16)
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["seed"] == 1 and meta["counts"] == {"good": 5, "scratch": 2, "crack": 2, "blob": 2}
    assert not [p for p in tmp_path.iterdir() if p.name != "s"]  # no temp dirs left behind


def test_defect_fraction_extremes(tmp_path: Path) -> None:
    none = make_synthetic(tmp_path / "n", n_train=2, n_test=4, size=8, defect_fraction=0.0)
    assert sorted(p.name for p in (none / "test").iterdir()) == ["good"]
    ds = load_mvtec(none, size=8)  # empty ground_truth/ exists: masks all zero, no warning
    assert ds.test_masks is not None and float(ds.test_masks.sum()) == 0
    full = make_synthetic(tmp_path / "f", n_train=2, n_test=2, size=8, defect_fraction=1.0)
    assert sorted(p.name for p in (full / "test").iterdir()) == ["crack", "scratch"]


def test_masks_mark_exactly_the_changed_visible_pixels(tmp_path: Path) -> None:
    size = 32
    root = make_synthetic(tmp_path / "s", n_train=2, n_test=24, size=size, seed=3)
    for kind in DEFECT_TYPES:
        for img_path in sorted((root / "test" / kind).glob("*.png")):
            img = _png(img_path)
            mask = _png(root / "ground_truth" / kind / f"{img_path.stem}_mask.png")
            assert set(np.unique(mask)) == {0.0, 1.0}
            m = mask > 0
            assert 0 < m.mean() < 0.1  # visible but not huge
            ring = binary_dilation(m, iterations=2) & ~m
            assert abs(img[m].mean() - img[ring].mean()) > 0.15, img_path


def test_defects_detectable_by_simple_local_outlier_score(tmp_path: Path) -> None:
    size = 32
    root = make_synthetic(tmp_path / "s", n_train=2, n_test=24, size=size, seed=4)
    ds = load_mvtec(root, size=size)
    x = ds.test[:, 0].numpy().astype(np.float64)
    scores = [np.abs(im - median_filter(im, size=size // 4 + 1)).max() for im in x]
    assert roc_auc_score(ds.test_labels, scores) > 0.95
    # normal train and good test images come from one distribution (similar statistics)
    tr = ds.train[:, 0].numpy()
    good = x[ds.test_labels == 0]
    assert abs(tr.mean() - good.mean()) < 0.1 and 0.01 < good.std() < 0.15


def test_reader_round_trip(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "s", n_train=3, n_test=6, size=16, seed=0)
    ds = load_mvtec(root, size=16)
    assert tuple(ds.train.shape) == (3, 1, 16, 16) and ds.channels == 1
    assert ds.test_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.test_types == ["good", "good", "good", "blob", "crack", "scratch"]
    direct = _png(root / "test" / "crack" / "000.png")
    np.testing.assert_allclose(ds.test[4, 0].numpy(), direct, atol=1e-6)
    m = ds.test_masks.numpy()[:, 0]  # type: ignore[union-attr]
    assert (m.reshape(6, -1).sum(1) > 0).tolist() == [False] * 3 + [True] * 3


def test_refuses_non_empty_dir_and_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    make_synthetic(out, n_train=2, n_test=2, size=8)  # empty dir is fine
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DatasetError) as info:
        make_synthetic(out, n_train=3, n_test=2, size=8)
    assert str(out) in str(info.value) and "overwrite" in str(info.value)
    assert "\n" not in str(info.value)
    assert (out / "keep.txt").exists() and len(list((out / "train" / "good").iterdir())) == 2
    make_synthetic(out, n_train=3, n_test=2, size=8, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert len(list((out / "train" / "good").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": 0}, "n_test"),
        ({"size": 4}, "size"),
        ({"seed": -1}, "seed"),
        ({"defect_fraction": 1.5}, "defect_fraction"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(DatasetError, match=field):
        make_synthetic(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_out_dir_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        make_synthetic(f, n_train=1, n_test=1, size=8)
