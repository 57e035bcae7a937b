"""`flipguard ra` end to end: bring-your-own classifier and a run directory."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from flipguard.cli.ra import register
from flipguard.errors import ConfigError
from flipguard.inject import ClassificationTask, Engine
from flipguard.ra import EngineEvaluator, build_exposure, exhaustive, load_systolic
from flipguard.ra.systolic import DEFAULT_TOML, SystolicConfig

app = typer.Typer()


@app.callback()
def _main() -> None:
    """flipguard (test app with the ra verb only)."""


register(app)
runner = CliRunner()

FACTORY = textwrap.dedent("""
    import torch

    def make():
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(),
                                   torch.nn.Linear(3, 3))
""")


def invoke(*args):
    return runner.invoke(app, ["ra", *[str(a) for a in args]], catch_exceptions=False)


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ra_byo")
    (root / "tiny_ra_net.py").write_text(FACTORY)
    import sys

    sys.path.insert(0, str(root))
    g = torch.Generator().manual_seed(0)
    from tiny_ra_net import make  # type: ignore[import-not-found]

    net = make()
    for prm in net.parameters():
        torch.nn.init.normal_(prm, std=0.7, generator=g)
    x = torch.randn(16, 4, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3
    torch.save(net.state_dict(), root / "w.pt")
    torch.save({"inputs": x, "labels": y}, root / "d.pt")
    ev = EngineEvaluator(Engine(net.eval(), x, ClassificationTask(y)))
    exact = {hw: exhaustive(build_exposure(net, x[:1], hw), ev, ev.golden_accuracy)[0]
             for hw in ("systolic", "uniform")}
    yield root, exact, ev.golden_accuracy
    sys.path.remove(str(root))


def _byo_args(root: Path):
    return ("--model", "tiny_ra_net:make", "--weights", root / "w.pt", "--data", root / "d.pt")


def test_byo_classifier_importance_sampling_resume_and_reweight(byo):
    root, exact, golden = byo
    args = (*_byo_args(root), "--hardware", "systolic", "--estimator", "is", "--pilot", "2",
            "--max-samples", 600, "--batch", 100, "--target-margin", 0.005, "--json")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("ra", "ci", "samples", "ess", "golden_accuracy", "accuracy_drop", "hardware"):
        assert key in out
    assert out["hardware"] == "systolic" and out["estimator"] == "is"
    assert out["golden_accuracy"] == pytest.approx(golden)
    assert out["accuracy_drop"] == pytest.approx(golden - out["ra"])
    assert out["ci"][0] <= out["ra"] <= out["ci"][1]
    assert abs(out["ra"] - exact["systolic"]) <= 4 * out["half_width"]
    assert out["ess"] > 0 and out["samples"] <= 600 and out["injections"] > 0
    assert out["interval"] == "betting-cs" and out["adaptive"]["alpha_now"] >= 0.2
    saved = json.loads((root / "ra.json").read_text())
    assert saved["schema"] == "flipguard.ra/1" and saved["ra"] == out["ra"]
    assert saved["by_hardware"]["systolic"]["ci"] == out["ci"]
    # resume: same settings redraw the stored sites, nothing is injected again
    again = json.loads(invoke(*args).stdout)
    assert again["injections"] == 0 and again["ra"] == out["ra"]
    # re-weight the stored systolic samples to the uniform model without injecting
    rw = invoke(*_byo_args(root), "--hardware", "uniform", "--estimator", "is",
                "--reweight-from", "systolic", "--json")
    assert rw.exit_code == 0, rw.output
    r = json.loads(rw.stdout)
    assert r["injections"] == 0 and r["reweighted_from"]["hardware"] == "systolic"
    assert r["samples"] == out["samples"] and r["hardware"] == "uniform"
    assert r["interval"] == "betting-cs" and r["ci"][0] <= exact["uniform"] <= r["ci"][1]
    assert abs(r["ra"] - exact["uniform"]) <= 4 * r["half_width"]
    assert set(json.loads((root / "ra.json").read_text())["by_hardware"]) == {"systolic",
                                                                             "uniform"}


def test_byo_errors_are_one_line(byo, tmp_path):
    root, _, _ = byo
    bad = tmp_path / "hw.toml"
    bad.write_text("[array]\nrows = 0\n")
    nolabels = tmp_path / "d.pt"
    torch.save({"inputs": torch.zeros(2, 4)}, nolabels)
    cases = [
        ((*_byo_args(root), "--hardware", "gpu"), "--hardware"),
        ((*_byo_args(root), "--hardware", f"systolic:{bad}"), "array.rows"),
        (("--model", "tiny_ra_net:make", "--weights", root / "w.pt", "--data", nolabels),
         "'labels'"),
        ((root, *_byo_args(root)), "not both"),
        ((*_byo_args(root), "--estimator", "sis"), "--estimator"),
        ((*_byo_args(root), "--targets", "weights"), "--targets"),
        ((*_byo_args(root), "--interval", "wald"), "--interval"),
        ((*_byo_args(root), "--min-samples", 100, "--max-samples", 10),
         "--min-samples: 100 is more than --max-samples 10"),
        ((*_byo_args(root), "--images", 0), "--images"),
    ]
    for args, text in cases:
        res = invoke(*args, "--out", tmp_path)
        assert res.exit_code == 2, res.output
        line = " ".join(res.stderr.split())
        assert text in line and res.stderr.strip().count("\n") == 0, res.stderr


def test_run_directory_detector(tmp_path):
    from flipguard.data import load_mvtec, make_synthetic
    from flipguard.detect import ScoreConfig, Scorer
    from flipguard.models import CAEConfig, build_cae
    from flipguard.study.rundir import (
        DataSection,
        ModelSection,
        RunConfig,
        ThresholdSection,
        save_run,
    )

    data = make_synthetic(tmp_path / "data", n_train=2, n_test=8, size=16, seed=0)
    params = {"input_size": 16, "width": 0.125, "latent_dim": 4}
    model = build_cae(CAEConfig(**params)).eval()
    score = {"map": "l2", "smooth_sigma": 0.0, "reduce": "mean"}
    ds = load_mvtec(data, size=16, channels=1)
    scorer = Scorer(ScoreConfig(**score))
    with torch.no_grad():
        s = scorer.scores(ds.test, model(ds.test)).numpy()
    thr = float(np.median(s))
    golden = float(((s > thr) == (np.asarray(ds.test_labels) > 0)).mean())
    cfg = RunConfig(data=DataSection(path=str(data), size=16), score=score,
                    model=ModelSection(kind="cae", params=params),
                    threshold=ThresholdSection(value=thr))
    run = save_run(tmp_path / "run", cfg, model)
    res = invoke(run, "--hardware", "memory", "--max-samples", 48, "--batch", 16,
                 "--min-samples", 16, "--target-margin", 0, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["golden_accuracy"] == pytest.approx(golden)
    assert out["samples"] == 48 and out["stopped"] == "max-samples"
    assert out["task"] == "detection" and out["n_images"] == 8
    assert set(out["exposure_share"]) == {"weight", "activation"}
    assert (run / "ra.json").is_file() and (run / "ra.sqlite").is_file()
    human = invoke(run, "--hardware", "memory", "--max-samples", 48, "--batch", 16,
                   "--min-samples", 16, "--target-margin", 0)
    assert human.exit_code == 0 and "Resiliency Accuracy" in human.stderr


def test_default_toml_matches_dataclass_defaults(tmp_path):
    assert load_systolic() == SystolicConfig()
    f = tmp_path / "hw.toml"
    f.write_text('[array]\nrows = 4\ndataflow = "os"\n[accumulator_bits]\nint8 = 24\n')
    cfg = load_systolic(f)
    assert (cfg.rows, cfg.cols, cfg.dataflow) == (4, 16, "output-stationary")
    assert cfg.accumulator_bits["int8"] == 24 and cfg.source == str(f)
    assert build_exposure(nn.Linear(2, 2), torch.zeros(1, 2), f"systolic:{f}").name == \
        f"systolic:{f}"
    assert DEFAULT_TOML.is_file()


@pytest.mark.parametrize("text, field", [
    ("[array]\nrows = 0\n", "array.rows"),
    ("[array]\nrowz = 3\n", "array.rowz"),
    ('[array]\ndataflow = "diagonal"\n', "array.dataflow"),
    ("[buffers]\nweight_kib = -1\n", "buffers.weight_kib"),
    ("[accumulator_bits]\nfp32 = 99\n", "accumulator_bits.fp32"),
    ("[cache]\nx = 1\n", "[cache]"),
    ("rows = = 3\n", "not valid TOML"),
])
def test_bad_toml_is_one_line_naming_file_and_field(tmp_path, text, field):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_systolic(f)
    msg = str(err.value)
    assert str(f) in msg and field in msg and "\n" not in msg


def test_bad_hardware_and_targets():
    net = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="--hardware"):
        build_exposure(net, torch.zeros(1, 2), "gpu")
    with pytest.raises(ConfigError, match="--targets"):
        build_exposure(net, torch.zeros(1, 2), "uniform", targets=("weights",))
    with pytest.raises(ConfigError, match="hardware file not found"):
        build_exposure(net, torch.zeros(1, 2), "systolic:/nonexistent.toml")
