"""CLI core verbs (synth, train, evaluate) and the run directory, end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipguard.cli import app
from flipguard.detect import reconstruct
from flipguard.errors import FlipguardError
from flipguard.metrics import image_auroc
from flipguard.study.rundir import load_run, state_fingerprint

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    data, run = root / "data", root / "run"
    res = invoke("synth", data, "--n-train", 24, "--n-test", 16, "--size", 32, "--seed", 1)
    assert res.exit_code == 0, res.output
    res = invoke(
        "train", "--data", data, "--out", run, "--size", 32, "--width", 0.25, "--latent", 8,
        "--epochs", 3, "--batch-size", 8, "--lr", 1e-3, "--json",
    )
    assert res.exit_code == 0, res.output
    return run


def test_train_writes_complete_run(tiny_run: Path) -> None:
    for name in ("config.json", "model.pt", "metrics.json"):
        assert (tiny_run / name).is_file()
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["params"]["input_size"] == 32
    assert cfg["data"]["size"] == 32
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy", "threshold", "n_test"):
        assert key in metrics
    assert metrics["n_test"] == 16


def test_threshold_comes_from_normal_validation_only(tiny_run: Path) -> None:
    from flipguard.data import split_validation

    run = load_run(tiny_run)
    ds = run.load_data()
    th = run.config.threshold
    assert th.method == "auto" and th.rule_used == "tail" and th.fpr == 0.05
    # 24 train images: the validation split is raised to the tail model's minimum of 4
    _, val_idx = split_validation(len(ds.train), run.config.data.val_fraction, seed=0)
    assert len(val_idx) == 4
    val = ds.train[torch.as_tensor(val_idx)]
    s = np.sort(run.scorer.scores(val, reconstruct(run.model, val)).numpy().astype(np.float64))
    # independent restatement of the tail rule: exponential tail above the median
    u, excess = s[1], s[2:] - s[1]
    expected = u + excess.mean() * np.log((3 / 5) / 0.05)
    assert run.threshold == pytest.approx(expected, rel=1e-6)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["threshold_method"] == "auto" and metrics["target_fpr"] == 0.05
    assert metrics["threshold_rule_used"] == "tail"
    assert metrics["val_images"] == 4


def test_options_are_checked_before_training_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert invoke("synth", data, "--n-train", 8, "--n-test", 4, "--size", 16).exit_code == 0
    for opts, word in ((["--quantile", "2"], "quantile"), (["--fpr", "1.5"], "fpr"),
                       (["--fpr", "0"], "fpr"), (["--threshold", "median"], "threshold"),
                       (["--resize", "crop"], "resize"), (["--crop", "20"], "crop"),
                       (["--map", "l1"], "map"), (["--bottleneck", "x"], "bottleneck")):
        res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"),
                                  "--size", "16", "--epochs", "1", *opts])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and word in lines[0], res.output
        assert not (tmp_path / "r").exists()


def test_evaluate_json_matches_independent_recomputation(tiny_run: Path) -> None:
    res = invoke("evaluate", tiny_run, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    run = load_run(tiny_run)
    ds = run.load_data()
    scores = run.scorer.scores(ds.test, reconstruct(run.model, ds.test)).numpy()
    assert out["image_auroc"] == pytest.approx(image_auroc(ds.test_labels, scores))
    pred = scores > run.threshold
    assert out["accuracy"] == pytest.approx(float((pred == (ds.test_labels > 0)).mean()))
    assert out["n_test"] == len(ds.test)


def test_run_reload_is_exact(tiny_run: Path) -> None:
    a, b = load_run(tiny_run), load_run(tiny_run)
    assert a.model_fingerprint() == b.model_fingerprint()
    state = torch.load(tiny_run / "model.pt", weights_only=True)
    assert state_fingerprint(state) == a.model_fingerprint()


def test_load_run_errors_are_one_line(tmp_path: Path, tiny_run: Path) -> None:
    with pytest.raises(FlipguardError, match="run directory not found"):
        load_run(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        (tiny_run / "config.json").read_text().replace('"value"', '"valu"')
    )
    with pytest.raises(FlipguardError) as exc:
        load_run(broken)
    assert "config.json" in str(exc.value) and "\n" not in str(exc.value)
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    with pytest.raises(FlipguardError, match="model.pt"):
        load_run(broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FlipguardError, match="cannot load weights"):
        load_run(broken)


def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["evaluate", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "run directory not found" in res.output
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "nodata"), "--out",
                              str(tmp_path / "r"), "--epochs", "1"])
    assert res.exit_code == 2
    assert "nodata" in res.output
    assert not (tmp_path / "r").exists()


def test_map_choice_and_threshold_do_not_depend_on_the_test_set(tmp_path: Path) -> None:
    # Same train/good, different test sets: the auto-chosen map, the standardisation and the
    # threshold (all from normal data) are identical; only the test metrics differ.
    import shutil

    from flipguard.study.detector import train_detector

    a, b = tmp_path / "a", tmp_path / "b"
    for root, n_test, seed in ((a, 8, 2), (b, 12, 3)):
        res = invoke("synth", root, "--n-train", 24, "--n-test", n_test, "--size", 16,
                     "--seed", seed)
        assert res.exit_code == 0
    shutil.rmtree(b / "train")
    shutil.copytree(a / "train", b / "train")
    kw = dict(size=16, model={"width": 0.25, "latent_dim": 4, "bottleneck": "spatial"},
              train={"epochs": 2, "batch_size": 8, "lr": 1e-3, "inpaint": 0.5},
              score={"map": "auto", "standardize": True, "smooth_sigma": 1.0})
    ra, rb = train_detector(a, tmp_path / "ra", **kw), train_detector(b, tmp_path / "rb", **kw)
    assert ra.config.score == rb.config.score and ra.threshold == rb.threshold
    assert ra.model_fingerprint() == rb.model_fingerprint()
    assert ra.metrics["map_selection"] == rb.metrics["map_selection"]
    assert ra.metrics["n_test"] == 8 and rb.metrics["n_test"] == 12
