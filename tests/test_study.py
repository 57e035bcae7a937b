"""`flipguard study`: every stage for every object of a root, resumable per stage and object,
one object's failure leaves the others complete, cross-object figures in study.html."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flipguard.campaign import PlanConfig
from flipguard.cli import app
from flipguard.data.synth import make_synthetic
from flipguard.errors import ConfigError
from flipguard.study.campaigns import CampaignOptions
from flipguard.study.detector import detector_options
from flipguard.study.objects import STAGES, StudyOptions, discover, run_study

TRAIN = detector_options(size=32, width=0.25, latent=8, latent_stride=8, epochs=2,
                         batch_size=8, map="l2", smooth=1.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("objects")
    for i, name in enumerate(("alpha", "beta")):
        make_synthetic(r / name, n_train=24, n_test=10, size=32, seed=i)
    return r


def _opts(**kw) -> StudyOptions:
    base = dict(train=TRAIN, plan=PlanConfig(strata="layer", error=0.4, confidence=0.8,
                                            seed=0),
                campaign=CampaignOptions(images=6), budget=0.05)
    return StudyOptions(**{**base, **kw})


def test_discover_root_of_objects_and_single_category(root: Path) -> None:
    assert [n for n, _, _ in discover(root)] == ["alpha", "beta"]
    assert discover(root / "alpha") == [("alpha", root / "alpha", None)]
    with pytest.raises(ConfigError, match="'gamma' not found"):
        discover(root, ["gamma"])


def test_study_runs_every_stage_and_resumes_without_redoing(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    seen: list[dict] = []
    rec = run_study(root, out, _opts(), watch=seen.append)
    assert [r["name"] for r in rec["categories"]] == ["alpha", "beta"]
    for r in rec["categories"]:
        assert r["status"] == "complete", r["stages"]
        assert all(r["stages"][s]["done"] for s in STAGES)
        assert 0.0 <= r["network"]["cfr"] <= 1.0
        assert r["hardening"] is not None and r["metrics"]["image_auroc"] is not None
        cfr = json.loads((out / r["name"] / "cfr.json").read_text())
        assert {"network", "layer", "bit", "layer_kernel"} <= set(cfr)
        assert len(cfr["layer"]) >= 2 and cfr["bit"]
    agg = rec["aggregate"]
    cfrs = [r["network"]["cfr"] for r in rec["categories"]]
    assert agg["cfr"]["mean"] == pytest.approx(sum(cfrs) / 2)
    assert agg["cfr"]["min"] == min(cfrs) and agg["objects"] == 2
    assert rec["kernel_layers"] and len(rec["kernel_layers"]) == 2
    html = (out / "study.html").read_text()
    assert "<svg" in html or "data:image/png;base64" in html
    assert "alpha" in html and "beta" in html
    assert json.loads((out / "study.json").read_text())["schema"] == "flipguard.study/1"
    assert seen and set(seen[-1]) == {"alpha", "beta"}
    # resume: nothing is retrained or re-simulated
    model = out / "alpha" / "run" / "model.pt"
    stamp = model.stat().st_mtime_ns
    stages = (out / "alpha" / "stages.json").read_text()
    rec2 = run_study(root, out, _opts())
    assert model.stat().st_mtime_ns == stamp
    assert (out / "alpha" / "stages.json").read_text() == stages
    assert [r["network"] for r in rec2["categories"]] == [r["network"] for r in
                                                         rec["categories"]]


def test_one_failing_object_does_not_stop_the_others(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "root"
    bad.mkdir()
    (bad / "alpha").symlink_to(root / "alpha")
    (bad / "broken" / "train" / "good").mkdir(parents=True)  # no images
    rec = run_study(bad, tmp_path / "out", _opts(budget=None))
    rows = {r["name"]: r for r in rec["categories"]}
    assert rows["alpha"]["status"] == "complete"
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["stages"]["train"]["done"] is False
    assert rows["broken"]["stages"]["train"]["error"]
    assert rec["aggregate"]["objects"] == 2


def test_bad_training_option_is_refused_before_anything_runs(root: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="resize"):
        run_study(root, tmp_path / "o", _opts(train={**TRAIN, "resize": "squash"}))
    with pytest.raises(Exception, match="cv_folds"):
        run_study(root, tmp_path / "o", _opts(train={**TRAIN, "cv_folds": 1}))
    assert not (tmp_path / "o").exists()


def test_study_cli_categories_and_json(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, [
        "study", str(root), "--out", str(out), "--categories", "beta", "--size", "32",
        "--width", "0.25", "--epochs", "1", "--strata", "layer", "--error", "0.4",
        "--confidence", "0.8", "--images", "4", "--budget", "-1", "--cv-folds", "2", "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "beta" / "run" / "metrics.json").read_text())
    assert metrics["cv_folds"] == 2 and metrics["threshold_scores"] == 24
    assert metrics["val_images"] == 12 and len(metrics["cv_fold_fpr"]) == 2
    rec = json.loads((out / "study.json").read_text())
    assert [r["name"] for r in rec["categories"]] == ["beta"]
    assert rec["categories"][0]["status"] == "complete"
    assert "harden" not in rec["categories"][0]["stages"]
    assert not (out / "alpha").exists()
