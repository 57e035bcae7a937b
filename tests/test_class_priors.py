"""Calibrated class priors of stratified plans: taken from the run's calibration, frozen into
the plan, cheaper where the calibration is right and still covering where it is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import beta
from typer.testing import CliRunner

from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.substrata import CLASS_PRIORS, run_stratified
from flipguard.errors import ConfigError
from flipguard.study.calibration import Calibration, class_priors_option

CRIT = "accuracy-drop:0.01"


def test_calibrated_priors_are_the_cautious_end_of_each_interval():
    c = Calibration(((9825, 0), (0, 0), (797, 5), (633, 185), (1193, 1193)), 1)
    got = c.priors(0.9)
    want = [1 - 0.05 ** (1 / 9825), CLASS_PRIORS[1], beta.ppf(0.95, 6, 792),
            beta.ppf(0.95, 186, 448), beta.ppf(0.05, 1193, 1)]  # nearest 1/2 in the 90 % CP
    assert np.allclose(got, want, rtol=1e-6)
    assert c.priors(0.99)[0] > got[0]  # more caution, a higher rare rate


def test_class_priors_option_and_config_errors_are_one_line():
    assert class_priors_option("fixed") == (None, False)
    assert class_priors_option(" Calibrated ") == (None, True)
    with pytest.raises(ConfigError, match="class-priors: expected 5 rates"):
        class_priors_option("0.1,0.2")
    with pytest.raises(ConfigError, match="class-priors: expected 5 rates"):
        class_priors_option("0,0.1,0.2,0.3,0.4")
    with pytest.raises(ConfigError, match="use --sampling stratified"):
        PlanConfig(class_priors=(0.1,) * 5)
    cfg = PlanConfig(sampling="stratified", class_priors=[0.001, 0.01, 0.1, 0.5, 0.9])
    assert PlanConfig.from_dict(cfg.to_dict()) == cfg and cfg.class_priors[0] == 0.001
    plain = PlanConfig(sampling="stratified")
    assert "class_priors" not in plain.to_dict()  # plans without priors keep their digests
    assert cfg.digest() != plain.digest()


def _population() -> tuple[np.ndarray, np.ndarray]:
    """A layer-like stratum: a large predicted-harmless class with a rare heavy pocket
    (0.1 % of it, all in one twentieth) and a small mostly critical class."""
    rng = np.random.default_rng(5)
    cls = np.repeat([0, 1], [120_000, 4_000])
    truth = np.zeros(cls.size, bool)
    h0 = np.flatnonzero(cls == 0)
    truth[rng.choice(h0[: len(h0) // 20], 120, replace=False)] = True
    truth[rng.choice(np.flatnonzero(cls == 1), 3_000, replace=False)] = True
    return cls, truth


def test_calibrated_priors_cost_less_and_every_prior_covers():
    """Priors shape allocation and round weights only: the calibrated ones (close to the
    true rates) need fewer faults than the fixed ones at the same margin, and a misleading
    calibration (20x too low) costs faults but the interval still covers (300 campaigns
    each at nominal 95 %)."""
    cls, truth = _population()
    exact = truth.mean()
    reps, out = 300, {}
    for name, pri in (("fixed", (0.0135, 0.9)), ("calibrated", (0.0012, 0.76)),
                      ("misleading", (0.00005, 0.76))):
        hit = cost = margin = 0.0
        for seed in range(reps):
            r = run_stratified(cls, lambda j: truth[j], error=0.01, confidence=0.95, seed=seed,
                               key="k", priors=pri, sequential=True)
            hit += r.estimate.ci[0] <= exact <= r.estimate.ci[1]
            cost += r.total
            margin += r.estimate.margin
        out[name] = (hit / reps, cost / reps, margin / reps)
    assert all(c >= 0.93 for c, _, _ in out.values()), out
    assert out["calibrated"][1] < 0.9 * out["fixed"][1], out
    assert out["calibrated"][2] <= 0.01, out  # cheaper, not by giving up the margin


def test_campaign_plans_with_the_runs_calibrated_priors(tmp_path):
    from flipguard.campaign.store import CampaignStore
    from flipguard.cli import app
    from flipguard.study.calibration import CALIBRATION_FILE, calibration_key, load_calibration
    from flipguard.study.engines import RunEngineFactory
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    base = ["--layers", "encoder.0", "--target-margin", "0.05", "--confidence", "0.95",
            "--sampling", "stratified", "--images", "6", "--class-groups", "none"]
    cli = CliRunner()
    plan = lambda *a: json.loads(cli.invoke(  # noqa: E731
        app, ["campaign", "plan", str(run), *base, "--probe", "0", "--json", *a]).stdout)
    first = plan()
    assert any(n.startswith("class priors: fixed (no calibration") for n in first["notes"])
    assert "class_priors" not in first["config"]
    assert {s["p"] for s in first["strata"]} <= set(CLASS_PRIORS)
    res = cli.invoke(app, ["campaign", "run", str(run), *base, "--json"])
    assert res.exit_code == 0, res.output
    (run / "campaign.sqlite").rename(tmp_path / "old.sqlite")
    cfg = PlanConfig(layers=("encoder.0",), error=0.05, confidence=0.95,
                     sampling="stratified", criterion=CRIT)
    calib = load_calibration(run, calibration_key(RunEngineFactory(str(run), images=6), cfg))
    assert calib is not None and (run / CALIBRATION_FILE).exists()
    fresh = plan()
    assert fresh["config"]["class_priors"] == pytest.approx(list(calib.priors()))
    for s in fresh["strata"]:  # every sub-stratum plans with its class's calibrated prior
        if s["crit"] < 5:
            assert s["p"] == pytest.approx(calib.priors()[s["crit"]])
    note = next(n for n in fresh["notes"] if n.startswith("class priors"))
    assert f"calibrated on {calib.faults:,} faults" in note
    assert "class_priors" not in plan("--class-priors", "fixed")["config"]
    given = plan("--class-priors", "0.001,0.002,0.003,0.004,0.005")["config"]["class_priors"]
    assert given == [0.001, 0.002, 0.003, 0.004, 0.005]
    # frozen into the store: a resumed campaign keeps them, the same seed gives the same faults
    res = cli.invoke(app, ["campaign", "run", str(run), *base, "--limit", "3", "--json"])
    assert res.exit_code == 0, res.output
    with CampaignStore(run / "campaign.sqlite") as store:
        assert store.definition["plan"]["class_priors"] == pytest.approx(list(calib.priors()))
        drawn = [(pf.stratum, pf.k) for pf in store.planned()]
    resumed = plan()
    assert any("as the campaign being resumed" in n for n in resumed["notes"])
    assert resumed["config"]["class_priors"] == fresh["config"]["class_priors"]
    res = cli.invoke(app, ["campaign", "run", str(run), *base, "--json"])
    assert res.exit_code == 0, res.output
    with CampaignStore(run / "campaign.sqlite") as store:
        again = [(pf.stratum, pf.k) for pf in store.planned()]
        assert store.counts()["done"] == store.counts()["planned"]
    assert again[: len(drawn)] == drawn
