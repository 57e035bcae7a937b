"""Cross-validated threshold (``train --cv-folds K``): folds, out-of-fold scores, the threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipguard.cli import app
from flipguard.data import DatasetError, split_folds, split_validation
from flipguard.detect import Scorer, fit_map_stats, reconstruct
from flipguard.models import CAEConfig, build_cae
from flipguard.study.crossval import fold_rest
from flipguard.study.detector import train_detector
from flipguard.study.rundir import SCORES_FILE, RunError, load_threshold_scores
from flipguard.threshold import calibrate_threshold
from flipguard.train import TrainConfig, train_model

runner = CliRunner()
KW = dict(size=16, model={"width": 0.25, "latent_dim": 4, "bottleneck": "spatial"},
          train={"epochs": 2, "batch_size": 8, "lr": 1e-3, "inpaint": 0.5},
          score={"map": "l2", "standardize": True, "smooth_sigma": 1.0})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv") / "data"
    res = runner.invoke(app, ["synth", str(root), "--n-train", "24", "--n-test", "8",
                              "--size", "16", "--seed", "4"])
    assert res.exit_code == 0, res.output
    return root


@pytest.mark.parametrize("n,k", [(10, 3), (24, 5), (7, 7), (100, 2), (665, 10), (665, 5)])
def test_folds_partition_the_images_evenly_and_are_seeded(n: int, k: int) -> None:
    folds = split_folds(n, k, seed=3)
    assert len(folds) == k
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(n))
    assert max(f.size for f in folds) - min(f.size for f in folds) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(folds, split_folds(n, k, seed=3),
                                                    strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, split_folds(n, k, seed=4),
                                                        strict=True))
    # fold 0 is the validation set of the plain split at 1/k: the deployed model is unchanged
    tr, val = split_validation(n, 1 / k, seed=3)
    assert np.array_equal(folds[0], val) and np.array_equal(fold_rest(folds, 0), tr)
    for i in range(k):
        rest = fold_rest(folds, i)
        assert np.intersect1d(rest, folds[i]).size == 0 and rest.size + folds[i].size == n


@pytest.mark.parametrize("n,k,msg", [(10, 1, ">= 2"), (3, 4, "at least 4"), (5, True, ">= 2")])
def test_fold_errors_are_one_line(n: int, k: int, msg: str) -> None:
    with pytest.raises(DatasetError, match="cv_folds") as err:
        split_folds(n, k)
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_threshold_comes_from_out_of_fold_scores_of_every_normal_image(data, tmp_path) -> None:
    run = train_detector(data, tmp_path / "run", cv_folds=3, **KW)
    ds = run.load_data()
    n = len(ds.train)
    folds = split_folds(n, 3, seed=0)
    assert run.config.data.cv_folds == 3
    assert run.config.data.val_fraction == pytest.approx(folds[0].size / n)
    assert run.metrics["val_images"] == folds[0].size
    assert run.metrics["train_images"] == n - folds[0].size
    assert run.metrics["threshold_scores"] == n
    # independent restatement: each fold's model trained on the other folds only
    tcfg = TrainConfig(**KW["train"])
    mcfg = CAEConfig(input_size=16, channels=int(ds.train.shape[1]), seed=tcfg.seed,
                     **KW["model"])
    scores, models = [], []
    for k, held in enumerate(folds):
        rest = torch.as_tensor(fold_rest(folds, k))
        net = build_cae(mcfg)
        train_model(net, ds.train[rest], tcfg)
        net.eval()
        cfg = fit_map_stats(run.scorer.cfg.model_copy(update={"norm_mean": None,
                                                              "norm_std": None}),
                            net, ds.train[rest])
        x = ds.train[torch.as_tensor(held)]
        scores.append(Scorer(cfg).scores(x, reconstruct(net, x)).numpy())
        models.append(net)
    # the deployed model is fold 0's model, with its own standardisation
    for a, b in zip(run.model.state_dict().values(), models[0].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    pooled = np.concatenate(scores)
    assert pooled.size == n and len({s.tobytes() for s in scores}) == 3
    expected = calibrate_threshold(pooled, method="auto", fpr=0.05)
    assert run.threshold == pytest.approx(expected, rel=1e-6)
    assert run.config.threshold.val_stats["n"] == n
    # a threshold from fold 0 alone (the old rule) differs: the other folds count
    assert run.threshold != pytest.approx(calibrate_threshold(scores[0], method="auto",
                                                              fpr=0.05), rel=1e-6)
    bounds = np.cumsum([0] + [f.size for f in folds])
    assert run.metrics["cv_fold_fpr"] == [round(float((pooled[a:b] > run.threshold).mean()), 4)
                                          for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert len(run.metrics["cv_train_seconds"]) == 2
    # the calibration scores are kept in the run, in fold order, to re-threshold later
    kept, sizes = load_threshold_scores(run.path)
    assert sizes == [f.size for f in folds]
    np.testing.assert_allclose(kept, pooled, rtol=1e-6)
    assert calibrate_threshold(np.asarray(kept), method="auto", fpr=0.05) == \
        pytest.approx(run.threshold, rel=1e-6)


def test_plain_training_keeps_its_validation_scores_and_corrupt_files_are_one_line(
        data, tmp_path) -> None:
    run = train_detector(data, tmp_path / "run", **KW)
    ds = run.load_data()
    _, val = split_validation(len(ds.train), val_fraction=run.config.data.val_fraction, seed=0)
    x = ds.train[torch.as_tensor(val)]
    expected = run.scorer.scores(x, reconstruct(run.model, x)).numpy()
    kept, sizes = load_threshold_scores(run.path)
    assert sizes == [val.size] and run.metrics["threshold_scores"] == val.size
    np.testing.assert_allclose(kept, expected, rtol=1e-5)
    f = run.path / SCORES_FILE
    f.write_text('{"scores": [1.0, 2.0], "fold_sizes": [3]}')
    with pytest.raises(RunError, match="fold_sizes add up to 3") as err:
        load_threshold_scores(run.path)
    assert SCORES_FILE in str(err.value) and "\n" not in str(err.value)
    f.write_text("[1, 2")
    with pytest.raises(RunError, match="expected"):
        load_threshold_scores(run.path)
    f.unlink()
    assert load_threshold_scores(run.path) is None  # a run from before the file existed


def test_cli_refuses_bad_fold_counts_before_anything_is_written(data, tmp_path) -> None:
    for k, msg in (("1", "expected 0 (off) or an integer >= 2"), ("40", "at least 40")):
        out = tmp_path / f"run{k}"
        res = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--size",
                                  "16", "--epochs", "1", "--cv-folds", k])
        assert res.exit_code != 0
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "cv_folds" in lines[0] and msg in lines[0], res.output
        assert not out.exists()
