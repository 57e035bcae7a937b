"""Later stages check that the campaign store (and the result files) belong to the run as it
is now: `harden` refuses a campaign made at another threshold, `report` withholds results
of another threshold or model with a warning; one-line errors for bad budgets.

The store checks use only the CLI, so they also run against older versions of flipguard."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from flipguard.cli.harden import register as register_harden
from flipguard.cli.report import register as register_report
from flipguard.study.rundir import load_run, save_run
from test_paired import tiny_run

app = typer.Typer()
app.callback()(lambda: None)
register_harden(app)
register_report(app)
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def campaign_run(tmp_path_factory):
    run, _ = tiny_run(tmp_path_factory.mktemp("checks"))
    return run


def change_threshold(run, value: float) -> float:
    r = load_run(run)
    old = r.config.threshold.value
    th = r.config.threshold.model_copy(update={"value": value})
    save_run(run, r.config.model_copy(update={"threshold": th}), r.model)
    return old


# ECC on the weights corrects every single-bit flip and leaves the other faults unprotected:
# nothing is re-simulated, so only a store check can notice that the threshold moved
ECC = ("--schemes", "ecc", "--budget", "0.5", "--criterion", "any-flip", "--boot", "200",
       "--no-curve")


def test_harden_refuses_a_campaign_made_at_another_threshold(campaign_run):
    ok = invoke("harden", campaign_run, *ECC, "--json")
    assert ok.exit_code == 0, ok.output
    assert not json.loads(ok.stdout)["fault_free"]["changed"]
    old = change_threshold(campaign_run, 0.05)
    try:
        res = invoke("harden", campaign_run, *ECC, "--json")
        assert res.exit_code == 2, res.output
        line = " ".join(res.stderr.split())
        assert res.stderr.strip().count("\n") == 0, res.stderr
        assert "campaign.sqlite" in line and "another threshold" in line
        assert "flipguard campaign run" in line
    finally:
        change_threshold(campaign_run, old)


@pytest.mark.parametrize("budget, shown", [("-1", "-1"), ("nan", "nan")])
def test_harden_negative_budget_is_one_line(campaign_run, budget, shown):
    res = invoke("harden", campaign_run, "--budget", budget)
    assert res.exit_code == 2, res.output
    assert " ".join(res.stderr.split()) == (
        f"error: --budget: expected a memory overhead fraction >= 0, got {shown}")


def test_report_withholds_results_of_another_threshold_or_model(campaign_run, tmp_path):
    assert invoke("harden", campaign_run, *ECC).exit_code == 0  # RUN/hardening.json
    base = invoke("report", campaign_run, "--examples", "0", "--out", tmp_path / "a.html")
    assert base.exit_code == 0, base.output
    html = (tmp_path / "a.html").read_text()
    assert "withheld" not in base.stderr and "are not shown" not in html
    assert 'data-name="cfr_layer"' in html and 'data-name="hardening_measured"' in html
    old = change_threshold(campaign_run, 0.05)
    try:
        res = invoke("report", campaign_run, "--examples", "0", "--out", tmp_path / "b.html")
        assert res.exit_code == 0, res.output
        err = " ".join(res.stderr.split())
        assert "campaign results withheld:" in err and "another threshold" in err
        assert "hardening results withheld:" in err
        html = (tmp_path / "b.html").read_text()
        assert html.count('class="note warning"') >= 3  # summary, campaign and hardening
        assert "The campaign results are not shown" in html
        for table in ("cfr_layer", "cfr_bit", "campaign_strata", "hardening_measured"):
            assert f'data-name="{table}"' not in html
        # the detector itself is reported at the new threshold
        assert 'data-name="detector_scores"' in html
    finally:
        change_threshold(campaign_run, old)


def test_report_withholds_ra_of_another_model(campaign_run, tmp_path):
    from flipguard.study.resiliency import engine_for_run

    _, fps, source = engine_for_run(campaign_run, 4)
    ra = {"schema": "flipguard.ra/1", "ra": 0.75, "ci": [0.7, 0.8], "confidence": 0.95,
          "hardware": "memory", "format": "fp32", "n_images": 4, "source": source,
          "fingerprints": fps}
    (campaign_run / "ra.json").write_text(json.dumps(ra))
    try:
        shown = invoke("report", campaign_run, "--examples", "0", "--out", tmp_path / "a.html")
        assert shown.exit_code == 0 and "withheld" not in shown.stderr, shown.output
        assert "Resiliency accuracy 75 %" in (tmp_path / "a.html").read_text()
        ra["fingerprints"] = {**fps, "model": "0" * 64}
        (campaign_run / "ra.json").write_text(json.dumps(ra))
        res = invoke("report", campaign_run, "--examples", "0", "--out", tmp_path / "b.html")
        assert res.exit_code == 0, res.output
        err = " ".join(res.stderr.split())
        assert "resiliency results withheld:" in err and "another model" in err
        html = (tmp_path / "b.html").read_text()
        assert "Resiliency accuracy 75 %" not in html
        assert "The resiliency results are not shown" in html
    finally:
        (campaign_run / "ra.json").unlink()
