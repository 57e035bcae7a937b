"""`flipguard init`: a user's ResNet-20 classifier, a user's autoencoder (detection) and a
tolerance task become runs on which campaign, cfr, harden, ra, report and export work; a
received run never imports the code it names without consent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flipguard.cli import app
from flipguard.data.synth import make_synthetic
from flipguard.study.rundir import TRUST_ENV, load_run
from models_zoo import EXAMPLES, example

R20 = f"{EXAMPLES / 'resnet20.py'}:resnet20"
AE = f"{EXAMPLES / 'user_ae.py'}:user_ae"
PLAN = ["--strata", "layer", "--error", "0.4", "--confidence", "0.8", "--seed", "0"]


def cli(*args: object, code: int = 0) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res.output


def _save_r20(tmp: Path, width: int = 4, n: int = 24) -> tuple[Path, Path]:
    net = example("resnet20").resnet20(width)
    weights = tmp / "w.pt"
    torch.save(net.state_dict(), weights)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = net.eval()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10  # some wrong answers: golden accuracy 0.75
    data = tmp / "data.pt"
    torch.save({"inputs": x, "labels": y}, data)
    return weights, data


def _every_verb(run: Path) -> None:
    cli("campaign", "plan", run, *PLAN)
    cli("campaign", "run", run, *PLAN, "--images", 8)
    assert "done" in cli("campaign", "status", run)
    cli("campaign", "export", run, "--out", run / "faults.csv")
    assert (run / "faults.csv").read_text().count("\n") > 10
    rows = json.loads(cli("cfr", run, "--by", "layer", "--json"))
    assert rows and all(0.0 <= r["cfr"] <= 1.0 for r in rows)
    cli("harden", run, "--budget", 0.05)
    assert json.loads((run / "hardening.json").read_text())["fingerprints"]
    cli("ra", run, "--estimator", "mc", "--target-margin", 0.2, "--min-samples", 32,
        "--max-samples", 64, "--images", 8, "--seed", 0)
    assert json.loads((run / "ra.json").read_text())["schema"].startswith("flipguard.ra")
    cli("report", run)
    html = (run / "report.html").read_text()
    assert "withheld" not in html.lower() and "layer" in html


def test_resnet20_classifier_every_verb(tmp_path: Path) -> None:
    weights, data = _save_r20(tmp_path)
    run = tmp_path / "r20"
    out = cli("init", run, "--model", R20, "--param", "width=4", "--weights", weights,
              "--data", data, "--task", "classification", "--json")
    metrics = json.loads(out)
    assert metrics["task"] == "classification" and metrics["accuracy"] == pytest.approx(0.75)
    r = load_run(run)
    assert r.config.model.params == {"width": 4} and r.config.threshold is None
    assert json.loads(cli("evaluate", run, "--json"))["accuracy"] == pytest.approx(0.75)
    _every_verb(run)
    # the golden accuracy the campaign recorded is the classifier's, on the 8 images used
    from flipguard.campaign import CampaignStore, store_path
    with CampaignStore(store_path(run)) as store:
        golden = store.get_meta("golden")
    assert golden["kind"] == "classification"
    # activation clamping saves RUN/hardened: the hardened run of a user's model opens too
    # (harden signs it, the base run being trusted)
    cli("harden", run, "--budget", 0.2, "--schemes", "act,tmr")
    assert json.loads(cli("evaluate", run / "hardened", "--json"))["task"] == "classification"


def test_user_autoencoder_detection_every_verb(tmp_path: Path) -> None:
    data = make_synthetic(tmp_path / "d", n_train=30, n_test=12, size=32, seed=0)
    torch.save(example("user_ae").user_ae(width=4).state_dict(), tmp_path / "ae.pt")
    run = tmp_path / "ae"
    m = json.loads(cli("init", run, "--model", AE, "--param", "width=4", "--weights",
                       tmp_path / "ae.pt", "--data", data, "--size", 32, "--task",
                       "detection", "--fpr", 0.1, "--json"))
    assert m["task"] == "detection" and 0.0 <= m["image_auroc"] <= 1.0
    assert m["val_images"] == 30  # every train/good image calibrates the threshold
    r = load_run(run)
    assert r.config.threshold.fpr == 0.1 and r.config.task.kind == "detection"
    _every_verb(run)


def test_tolerance_task_on_tensor_file(tmp_path: Path) -> None:
    x = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "x.npz", inputs=x.numpy())
    run = tmp_path / "tol"
    m = json.loads(cli("init", run, "--model", AE, "--param", "width=2", "--data",
                       tmp_path / "x.npz", "--task", "tolerance", "--atol", 0.01, "--json"))
    assert m["task"] == "tolerance" and m["n_test"] == 10
    cli("campaign", "run", run, *PLAN, "--images", 4)
    assert json.loads(cli("cfr", run, "--json", "--criterion", "any-flip"))


def test_init_refuses_bad_input_writing_nothing(tmp_path: Path) -> None:
    weights, data = _save_r20(tmp_path)
    base = ["--model", R20, "--param", "width=4", "--weights", weights, "--data", data]
    out = cli("init", tmp_path / "a", *base, "--task", "detection", code=2)
    assert "reconstruct" in out and not (tmp_path / "a").exists()
    out = cli("init", tmp_path / "b", *base, "--task", "segmentation", code=2)
    assert "--task" in out and not (tmp_path / "b").exists()
    out = cli("init", tmp_path / "c", "--model", R20, "--weights", weights, "--data", data,
              "--task", "classification", code=2)
    assert "do not match" in out and not (tmp_path / "c").exists()
    out = cli("init", tmp_path / "d", *base[:-2], "--data", tmp_path / "nope.pt", code=2)
    assert "nope.pt" in out
    out = cli("init", tmp_path / "e", *base, "--param", "width", code=2)
    assert "KEY=VALUE" in out
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "mine.txt").write_text("keep")
    out = cli("init", tmp_path / "f", *base, "--task", "classification", code=2)
    assert "not empty" in out and (tmp_path / "f" / "mine.txt").read_text() == "keep"


@pytest.fixture
def signed_run(tmp_path: Path) -> Path:
    weights, data = _save_r20(tmp_path)
    run = tmp_path / "r20"
    cli("init", run, "--model", R20, "--param", "width=4", "--weights", weights, "--data",
        data, "--task", "classification")
    return run


def test_received_run_is_refused_without_consent(signed_run: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cli("evaluate", signed_run)  # this user's own run: no flag needed
    received = tmp_path / "received"
    shutil.copytree(signed_run, received)
    monkeypatch.setenv("FLIPGUARD_HOME", str(tmp_path / "other-user"))
    monkeypatch.setenv(TRUST_ENV, "0")
    out = cli("evaluate", received, code=2)
    assert "--trust-code" in out and "resnet20.py" in out
    assert len(out.strip().splitlines()) == 1
    out = cli("--trust-code", "evaluate", received, "--json")
    assert json.loads(out)["task"] == "classification"
    monkeypatch.setenv(TRUST_ENV, "0")
    cli("evaluate", received)  # the consent was recorded in the run


def test_received_run_naming_os_system_never_runs_it(signed_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cli("campaign", "run", signed_run, *PLAN, "--images", 4)
    marker = tmp_path / "PWNED"
    cfg = json.loads((signed_run / "config.json").read_text())
    cfg["model"] = {"kind": "factory", "factory": "os:system",
                    "params": {"command": f"touch {marker}"}}
    (signed_run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(TRUST_ENV, "0")
    for verb in (["evaluate", signed_run], ["cfr", signed_run],
                 ["campaign", "run", signed_run, *PLAN], ["report", signed_run],
                 ["harden", signed_run],
                 ["ra", signed_run, "--min-samples", 8, "--max-samples", 8]):
        out = cli(*verb, code=2)
        assert "os:system" in out and "--trust-code" in out, verb
        assert not marker.exists(), verb


@pytest.mark.parametrize("model", [
    # a flipguard callable that imports what its parameters name
    {"kind": "factory", "factory": "flipguard.models.loading:load_model",
     "params": {"spec": "os:system", "command": "touch {marker}"}},
    # flipguard's hardened-run wrapper around a received factory
    {"kind": "factory", "factory": "flipguard.study.hardening:build_hardened",
     "params": {"base": {"kind": "factory", "factory": "os:system",
                         "params": {"command": "touch {marker}"}}, "clamp_layers": []}},
])
def test_flipguard_callables_do_not_launder_received_code(
        signed_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: dict) -> None:
    marker = tmp_path / "PWNED"
    cfg = json.loads((signed_run / "config.json").read_text())
    cfg["model"] = json.loads(json.dumps(model).replace("{marker}", str(marker)))
    (signed_run / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(TRUST_ENV, "0")
    out = cli("evaluate", signed_run, code=2)
    assert "--trust-code" in out and not marker.exists()
