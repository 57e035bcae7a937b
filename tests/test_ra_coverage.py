"""Coverage with power: on toy populations with a known RA where 0.4 % of the probability
mass carries drops of 0.25-0.5 (unequal exposure per element and tensor, a few negative
drops), the sequential and fixed-n intervals of ``estimate_ra`` must cover the exact RA at
>= 95 %; in the same runs the old normal (CLT) interval is shown to fail (so the test would
fail for it). Population and runner: ``benchmarks/coverage_ra.py`` (its large-R version)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("coverage_ra", ROOT / "benchmarks" /
                                               "coverage_ra.py")
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)  # type: ignore[union-attr]

R = 200


@pytest.fixture(scope="module")
def toys():
    return {h: cov.toy_population(h) for h in ("weight", "sign")}


def test_toy_population_is_what_it_claims(toys):
    for heavy, toy in toys.items():
        sites, prob = toy.p.enumerate()
        acc = toy(sites)
        assert prob.sum() == pytest.approx(1.0) and len(sites) == 14_848
        assert toy.ra == pytest.approx(float(prob @ acc), abs=1e-12)  # exact RA
        big = (toy.golden - acc) >= 0.25
        assert 0.004 <= prob[big].sum() < 0.0045 and (toy.golden - acc)[big].max() <= 0.5
        assert ((toy.golden - acc) < 0).any()  # some faults improve the accuracy
        cell = (sites.bit == 31) if heavy == "sign" else (sites.bit == 30)
        assert big[~cell].sum() == 0  # every heavy site sits in the named cell


def _significantly_below(rate: float, n: int, level: float = 0.95) -> bool:
    return binomtest(round(rate * n), n, level, alternative="less").pvalue < 1e-3


def _not_below(rate: float, n: int, level: float = 0.95) -> bool:
    return binomtest(round(rate * n), n, level, alternative="less").pvalue > 1e-3


@pytest.mark.parametrize("heavy, estimator, kw", [
    ("weight", "mc", {"margin": 0.0025, "batch": 64}),  # MC, sequential to +-0.25 %
    ("sign", "is", {"margin": 0.0025, "batch": 128}),  # adaptive IS, adversarial cell
    ("sign", "is", {"n": 256, "batch": 64}),  # adaptive IS, adversarial, fixed n
])
def test_intervals_cover_under_stopping_and_rare_heavy_drops(toys, heavy, estimator, kw):
    toy = toys[heavy]
    new = cov.run(toy, estimator, "betting-cs", R, 0, **kw)
    old = cov.run(toy, estimator, "clt", R, 0, **kw)
    assert _not_below(new["coverage"], R), new
    assert _significantly_below(old["coverage"], R), old  # the old interval fails this test
    # not trivially wide: the new interval is within +-0.25 % when sequential
    if "margin" in kw:
        assert new["mean_width"] <= 2 * kw["margin"] + 1e-12
        assert new["samples"] < 3_000  # and the adaptive IS stays near MC's cost
    else:
        assert new["mean_width"] < 0.05


def test_tuned_adaptive_is_never_much_worse_than_mc(toys):
    """To the same valid margin the adaptive proposal (defensive share picked from the
    samples) needs no more samples than 1.2x plain MC on the toy, where MC is hard to beat."""
    toy = toys["weight"]
    mc = cov.run(toy, "mc", "betting-cs", 20, 500, margin=0.0025, batch=128)
    is_ = cov.run(toy, "is", "betting-cs", 20, 500, margin=0.0025, batch=128)
    assert is_["samples"] < 1.2 * mc["samples"], (is_, mc)
    assert np.isfinite(is_["mean_width"])
