"""MVTec-layout reader: formats, order, channels, masks, fingerprint, split and every error."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flipguard.data import DatasetError, load_mvtec, split_validation
from flipguard.errors import FlipguardError

S = 8  # output size used throughout


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return path


def _grey(value: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def _nearest(a: np.ndarray, s: int) -> np.ndarray:
    """Independent nearest-neighbour oracle: sample the source at output pixel centres."""
    h, w = a.shape
    iy = np.floor((np.arange(s) + 0.5) * h / s).astype(int)
    ix = np.floor((np.arange(s) + 0.5) * w / s).astype(int)
    return a[iy][:, ix]


def _tree(root: Path, with_gt: bool = True) -> dict[str, np.ndarray]:
    """Greyscale tree with mixed formats, odd stems, varying sizes. Returns the source masks."""
    train = root / "train" / "good"
    _save(train / "b.PNG", _grey(20, 12, 16))
    _save(train / "a.jpg", _grey(200, 9, 13))
    _save(train / "c d.bmp", _grey(60, 20, 10))
    _save(train / "x.y.z.TIF", _grey(90, 8, 8))
    _save(train / "e.tiff", _grey(120, 31, 17))
    _save(train / "f.jpeg", _grey(160, 16, 16))
    (train / "notes.txt").write_text("not an image")
    (train / ".hidden.png").write_bytes(b"junk")
    _save(root / "test" / "good" / "g1.png", _grey(30))
    _save(root / "test" / "good" / "g0.bmp", _grey(40, 10, 20))
    _save(root / "test" / "hole" / "h 1.tif", _grey(50, 12, 16))
    _save(root / "test" / "hole" / "001.png", _grey(70, 37, 23))
    _save(root / "test" / "crack" / "c.jpg", _grey(80, 16, 16))
    rng = np.random.default_rng(0)
    masks = {
        "hole/h 1": (rng.random((12, 16)) > 0.6).astype(np.uint8) * 7,  # non-255 value -> 1
        "hole/001": (rng.random((37, 23)) > 0.7).astype(np.uint8) * 255,
        "crack/c": np.pad(np.full((4, 4), 255, np.uint8), 6),
    }
    if with_gt:
        for key, m in masks.items():
            kind, stem = key.split("/")
            _save(root / "ground_truth" / kind / f"{stem}_mask.png", m)
    return masks


def test_reads_formats_order_labels_and_masks(tmp_path: Path) -> None:
    masks = _tree(tmp_path)
    ds = load_mvtec(tmp_path, size=S)
    assert ds.channels == 1
    assert tuple(ds.train.shape) == (6, 1, S, S) and ds.train.dtype == torch.float32
    assert [Path(p).name for p in ds.train_paths] == [
        "a.jpg",
        "b.PNG",
        "c d.bmp",
        "e.tiff",
        "f.jpeg",
        "x.y.z.TIF",
    ]
    # constant images stay constant under any resize: value/255, jpg within compression error
    expected = np.array([200, 20, 60, 120, 160, 90]) / 255
    means = ds.train.mean(dim=(1, 2, 3)).numpy()
    assert np.allclose(means, expected, atol=2 / 255)
    assert float((ds.train - ds.train.mean(dim=(2, 3), keepdim=True)).abs().max()) < 2 / 255
    assert [Path(p).name for p in ds.test_paths] == [
        "g0.bmp",
        "g1.png",
        "c.jpg",
        "001.png",
        "h 1.tif",
    ]
    assert ds.test_types == ["good", "good", "crack", "hole", "hole"]
    assert ds.test_labels.dtype == np.int64 and ds.test_labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.defect_types == ["crack", "hole"]
    assert np.allclose(
        ds.test[:, 0, 0, 0].numpy(), np.array([40, 30, 80, 70, 50]) / 255, atol=2 / 255
    )
    assert ds.test_masks is not None and tuple(ds.test_masks.shape) == (5, 1, S, S)
    got = ds.test_masks.numpy()
    assert set(np.unique(got)) <= {0.0, 1.0}
    assert got[:2].sum() == 0  # good images have empty masks
    for i, key in ((2, "crack/c"), (3, "hole/001"), (4, "hole/h 1")):
        np.testing.assert_array_equal(got[i, 0], (_nearest(masks[key], S) > 0).astype(np.float32))
    assert got[2].sum() > 0


def test_bilinear_resize_blends_edges(tmp_path: Path) -> None:
    a = np.zeros((16, 16), np.uint8)
    a[:, 8:] = 255
    _save(tmp_path / "train" / "good" / "0.png", a)
    _save(tmp_path / "test" / "good" / "0.png", a)
    with pytest.warns(UserWarning):
        ds = load_mvtec(tmp_path, size=4)
    row = ds.train[0, 0, 0].numpy()
    assert row[0] == 0 and row[-1] == 1 and np.all(np.diff(row) >= 0)
    with pytest.warns(UserWarning):
        up = load_mvtec(tmp_path, size=32).train[0, 0, 0].numpy()
    assert 0 < up[15] < 1 or 0 < up[16] < 1  # interpolated, not nearest


def test_channels_inference_and_conversion(tmp_path: Path) -> None:
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[...] = (10, 200, 30)
    _save(tmp_path / "train" / "good" / "rgb.png", rgb)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[...] = (100, 50, 250, 0)  # fully transparent: alpha is dropped, colour kept
    _save(tmp_path / "train" / "good" / "rgba.png", rgba)
    pal = Image.new("P", (9, 9), 0)
    pal.putpalette([255, 0, 0] + [0] * 765)
    pal.save(tmp_path / "train" / "good" / "pal.bmp")
    _save(tmp_path / "test" / "good" / "grey.jpg", _grey(128))
    with pytest.warns(UserWarning, match="ground_truth"):
        ds = load_mvtec(tmp_path, size=S)
    assert ds.channels == 3  # greyscale + colour mixed -> promoted to RGB
    names = [Path(p).name for p in ds.train_paths]
    assert names == ["pal.bmp", "rgb.png", "rgba.png"]
    colours = ds.train.mean(dim=(2, 3)).numpy() * 255
    np.testing.assert_allclose(colours, [[255, 0, 0], [10, 200, 30], [100, 50, 250]], atol=0.5)
    grey = ds.test[0].numpy()
    assert np.allclose(grey[0], grey[1]) and np.allclose(grey[0], grey[2])
    assert abs(grey.mean() * 255 - 128) <= 2
    with pytest.warns(UserWarning):
        ds1 = load_mvtec(tmp_path, size=S, channels=1)
    luma = np.array([[255, 0, 0], [10, 200, 30], [100, 50, 250]]) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(ds1.train.mean(dim=(1, 2, 3)).numpy() * 255, luma, atol=0.5)
    assert ds1.train.shape[1] == 1


def test_greyscale_promoted_and_16bit(tmp_path: Path) -> None:
    a16 = np.full((8, 10), 30000, dtype=np.uint16)
    _save(tmp_path / "train" / "good" / "deep.png", a16)
    _save(tmp_path / "train" / "good" / "bw.png", np.ones((8, 8), bool))  # mode "1"
    _save(tmp_path / "test" / "good" / "g.png", _grey(10))
    with pytest.warns(UserWarning):
        ds = load_mvtec(tmp_path, size=S, channels=3)
    assert tuple(ds.train.shape) == (2, 3, S, S)
    np.testing.assert_allclose(ds.train[0].numpy(), 1.0)  # bw.png: all ones
    np.testing.assert_allclose(ds.train[1].numpy(), 30000 / 65535, atol=1e-6)
    with pytest.warns(UserWarning):
        assert load_mvtec(tmp_path, size=S).channels == 1


def test_grey_palette_counts_as_greyscale(tmp_path: Path) -> None:
    pal = Image.new("P", (10, 6), 1)
    pal.putpalette([0, 0, 0, 77, 77, 77] + [0] * 762)
    pal.save(tmp_path / "p.png")
    (tmp_path / "train" / "good").mkdir(parents=True)
    shutil.copy(tmp_path / "p.png", tmp_path / "train" / "good" / "p.png")
    _save(tmp_path / "test" / "good" / "g.png", _grey(10))
    with pytest.warns(UserWarning):
        ds = load_mvtec(tmp_path, size=S)
    assert ds.channels == 1
    np.testing.assert_allclose(ds.train.numpy(), 77 / 255, atol=1e-6)


def test_fingerprint_tracks_content_not_location(tmp_path: Path) -> None:
    _tree(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fa, fb = load_mvtec(tmp_path / "a", size=S).fingerprint(), load_mvtec(tmp_path / "b", size=S)
    assert len(fa) == 64 and fa == fb.fingerprint()
    assert load_mvtec(tmp_path / "a", size=S + 2).fingerprint() != fa
    assert load_mvtec(tmp_path / "a", size=S, channels=3).fingerprint() != fa
    _save(tmp_path / "b" / "train" / "good" / "b.PNG", _grey(21, 12, 16))
    assert load_mvtec(tmp_path / "b", size=S).fingerprint() != fa


def test_no_ground_truth_warns_and_has_no_masks(tmp_path: Path) -> None:
    _tree(tmp_path, with_gt=False)
    with pytest.warns(UserWarning, match="pixel metrics are unavailable"):
        ds = load_mvtec(tmp_path, size=S)
    assert ds.test_masks is None and ds.test_labels.sum() == 3


def test_ground_truth_present_does_not_warn(tmp_path: Path) -> None:
    _tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_mvtec(tmp_path, size=S)


def test_category_handling(tmp_path: Path) -> None:
    _tree(tmp_path / "bottle")
    _save(tmp_path / "tile" / "train" / "good" / "0.png", _grey(99))
    _save(tmp_path / "tile" / "test" / "good" / "0.png", _grey(99))
    (tmp_path / "tile" / "ground_truth").mkdir()
    ds = load_mvtec(tmp_path, category="tile", size=S)
    assert len(ds.train_paths) == 1 and ds.root == tmp_path / "tile"
    assert np.allclose(ds.train.numpy(), 99 / 255)
    assert len(load_mvtec(tmp_path, category="bottle", size=S).train_paths) == 6
    msg = _error(lambda: load_mvtec(tmp_path, size=S), str(tmp_path))
    assert "bottle, tile" in msg
    msg = _error(lambda: load_mvtec(tmp_path, category="cable", size=S), str(tmp_path / "cable"))
    assert "bottle, tile" in msg


def _error(fn, path: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError) as info:
        fn()
    msg = str(info.value)
    assert isinstance(info.value, FlipguardError) and isinstance(info.value, ValueError)
    assert "\n" not in msg and path in msg, msg
    return msg


def test_structure_errors_name_the_path(tmp_path: Path) -> None:
    _error(lambda: load_mvtec(tmp_path / "nope"), str(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    _error(lambda: load_mvtec(tmp_path), str(tmp_path / "train" / "good"))
    (tmp_path / "train" / "good").mkdir()
    (tmp_path / "train" / "good" / "readme.txt").write_text("x")
    _error(lambda: load_mvtec(tmp_path), str(tmp_path / "train" / "good"))
    _save(tmp_path / "train" / "good" / "0.png", _grey(1))
    _error(lambda: load_mvtec(tmp_path), str(tmp_path / "test"))
    (tmp_path / "test").mkdir()
    _error(lambda: load_mvtec(tmp_path), str(tmp_path / "test"))
    _save(tmp_path / "test" / "good" / "0.png", _grey(1))
    (tmp_path / "test" / "scratch").mkdir()
    _error(lambda: load_mvtec(tmp_path), str(tmp_path / "test" / "scratch"))


@pytest.mark.parametrize("bad", [2, 4, 0, True])
def test_unreconcilable_channels_request(tmp_path: Path, bad: int) -> None:
    _tree(tmp_path)
    _error(lambda: load_mvtec(tmp_path, channels=bad), str(tmp_path))


def test_invalid_size(tmp_path: Path) -> None:
    _tree(tmp_path)
    _error(lambda: load_mvtec(tmp_path, size=0), str(tmp_path))


def test_missing_mask_and_mask_size_mismatch(tmp_path: Path) -> None:
    _tree(tmp_path)
    gt = tmp_path / "ground_truth"
    (gt / "hole" / "001_mask.png").unlink()
    msg = _error(lambda: load_mvtec(tmp_path, size=S), str(gt / "hole" / "001_mask.png"))
    assert "001.png" in msg
    _save(gt / "hole" / "001_mask.png", np.zeros((37, 24), np.uint8))
    msg = _error(lambda: load_mvtec(tmp_path, size=S), str(gt / "hole" / "001_mask.png"))
    assert "24x37" in msg and "23x37" in msg
    shutil.rmtree(gt / "crack")  # whole defect folder without masks
    _error(lambda: load_mvtec(tmp_path, size=S), str(gt / "crack" / "c_mask.png"))


@pytest.mark.parametrize("where", ["train/good/b.PNG", "test/hole/001.png", "test/crack/c.jpg"])
def test_corrupt_image_named(tmp_path: Path, where: str) -> None:
    _tree(tmp_path)
    path = tmp_path / where
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # truncated
    _error(lambda: load_mvtec(tmp_path, size=S), str(path))
    path.write_bytes(b"\x00garbage" * 10)
    _error(lambda: load_mvtec(tmp_path, size=S), str(path))


def test_corrupt_mask_named(tmp_path: Path) -> None:
    _tree(tmp_path)
    mask = tmp_path / "ground_truth" / "crack" / "c_mask.png"
    mask.write_bytes(b"not a png")
    _error(lambda: load_mvtec(tmp_path, size=S), str(mask))


def test_two_channel_image_rejected(tmp_path: Path) -> None:
    _tree(tmp_path)
    la = tmp_path / "train" / "good" / "la.png"
    Image.new("LA", (8, 8), (10, 255)).save(la)
    msg = _error(lambda: load_mvtec(tmp_path, size=S), str(la))
    assert "2 channels" in msg


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 57, 665])
@pytest.mark.parametrize("frac", [0.01, 0.1, 0.5, 0.99])
def test_split_validation_properties(n: int, frac: float) -> None:
    tr, val = split_validation(n, val_fraction=frac, seed=3)
    assert tr.dtype == np.int64 and val.dtype == np.int64
    assert np.intersect1d(tr, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, val])), np.arange(n))
    if n >= 2:
        assert 1 <= val.size <= n - 1
        assert val.size == min(max(1, round(n * frac)), n - 1)
    else:
        assert val.size == 0
    again = split_validation(n, val_fraction=frac, seed=3)
    np.testing.assert_array_equal(again[1], val)


def test_split_validation_seed_and_errors() -> None:
    vals = {tuple(split_validation(100, 0.1, seed=s)[1]) for s in range(5)}
    assert len(vals) == 5
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DatasetError, match="val_fraction"):
            split_validation(10, bad)
    with pytest.raises(DatasetError, match="n="):
        split_validation(-1)


def test_fit_resize_keeps_aspect_and_pads_with_edges(tmp_path: Path) -> None:
    # A 10 (h) x 40 (w) image with a horizontal ramp and a mask on its right quarter:
    # "fit" at 16 gives a 16 x 4 band centred vertically (rows 6..9), every margin row a
    # copy of the nearest band row, the mask only inside the band.
    ramp = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (10, 1))
    _save(tmp_path / "train" / "good" / "a.png", ramp)
    _save(tmp_path / "test" / "cut" / "b.png", ramp)
    mask = np.zeros((10, 40), np.uint8)
    mask[:, 30:] = 255
    _save(tmp_path / "ground_truth" / "cut" / "b_mask.png", mask)
    fit = load_mvtec(tmp_path, size=16, resize="fit")
    stretch = load_mvtec(tmp_path, size=16)
    img = fit.train[0, 0].numpy()
    ref = np.asarray(Image.fromarray(ramp).resize((16, 4), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(img[6:10], ref, atol=1e-6)
    np.testing.assert_array_equal(img[:6], np.repeat(img[6:7], 6, 0))
    np.testing.assert_array_equal(img[10:], np.repeat(img[9:10], 6, 0))
    m = fit.test_masks[0, 0].numpy()
    assert m[:6].sum() == 0 and m[10:].sum() == 0
    np.testing.assert_array_equal(m[6:10], _nearest(mask, 16)[:4] > 0)
    assert fit.resize == "fit" and fit.fingerprint() != stretch.fingerprint()
    ref_s = np.asarray(Image.fromarray(ramp).resize((16, 16), Image.Resampling.BILINEAR)) / 255
    np.testing.assert_allclose(stretch.train[0, 0].numpy(), ref_s, atol=1e-6)
    _error(lambda: load_mvtec(tmp_path, resize="crop"), str(tmp_path))


def test_graded_mask_warns_once_naming_the_file(tmp_path: Path) -> None:
    _tree(tmp_path)
    graded = np.zeros((12, 16), np.uint8)
    graded[2:6, 3:9], graded[6:8, 3:9] = 255, 128  # anti-aliased edge: two non-zero levels
    path = _save(tmp_path / "ground_truth" / "hole" / "h 1_mask.png", graded)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds = load_mvtec(tmp_path, size=S)
        load_mvtec(tmp_path, size=S)
    msgs = [str(w.message) for w in seen if "not binary" in str(w.message)]
    assert len(msgs) == 1 and str(path) in msgs[0]
    assert ds.test_masks is not None
    h1 = [i for i, p in enumerate(ds.test_paths) if Path(p).stem == "h 1"][0]
    assert torch.equal(ds.test_masks[h1, 0] > 0, torch.from_numpy(_nearest(graded, S) > 0))
