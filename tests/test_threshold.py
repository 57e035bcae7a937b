"""Normal-data-only thresholds: their false-positive rate on fresh normal scores from known
distributions (exact, via the distribution's survival function) against the target."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flipguard.errors import ConfigError
from flipguard.threshold import calibrate_threshold, check_fpr

# Score distributions of the kind anomaly scores have (all right-skewed or symmetric, all in
# the Gumbel max-domain). Locations/scales are arbitrary: the methods are scale-equivariant.
DISTS = {
    "normal": stats.norm(1.0, 0.1),
    "lognormal": stats.lognorm(0.4, scale=0.5),
    "gumbel": stats.gumbel_r(0.5, 0.05),
    "gamma": stats.gamma(3.0, scale=0.1),
}
R = 600  # replications: the mean FPR has a relative standard error of a few per cent


def _mean_fpr(dist, n: int, fpr: float, seed: int, **kw) -> float:
    """Average over R validation sets of size n of the exact FPR of the threshold."""
    rng = np.random.default_rng(seed)
    sets = dist.rvs(size=(R, n), random_state=rng)
    thr = np.array([calibrate_threshold(s, fpr=fpr, **kw) for s in sets])
    return float(dist.sf(thr).mean())


@pytest.mark.parametrize("name", sorted(DISTS))
def test_empirical_threshold_has_the_target_fpr_for_any_distribution(name):
    # (n + 1)(1 - fpr) = 20 is an integer: E[FPR] = 1 - 20/21 = fpr exactly for any
    # continuous distribution; sd of one FPR is ~0.046, of the mean over 600 ~0.0019.
    n, fpr = 20, 1 / 21
    got = _mean_fpr(DISTS[name], n, fpr, seed=1, method="empirical")
    assert abs(got - fpr) < 4 * 0.046 / np.sqrt(R)
    # The legacy rule (np.quantile, linear) at the same level: E[FPR] = 1 - 19.05/21 = 0.093,
    # nearly twice the target — this is what the test catches.
    old = _mean_fpr(DISTS[name], n, fpr, seed=1, method="quantile", quantile=1 - fpr)
    assert old > 1.7 * fpr


@pytest.mark.parametrize("name", sorted(DISTS))
@pytest.mark.parametrize(("n", "fpr"), [(8, 0.01), (20, 0.01), (20, 0.05), (66, 0.05)])
def test_tail_threshold_fpr_near_target_even_for_tiny_validation_sets(name, n, fpr):
    got = _mean_fpr(DISTS[name], n, fpr, seed=2, method="tail")
    lo, hi = (0.3, 3.2) if n < 10 else (0.4, 2.6)
    assert lo * fpr < got < hi * fpr, got / fpr
    if (n + 1) * fpr < 0.5:
        # the legacy quantile collapses onto the sample maximum: its FPR stays ~ 1/(n + 1)
        # whatever the target (11x the target at n = 8, 5x at n = 20)
        old = _mean_fpr(DISTS[name], n, fpr, seed=2, method="quantile", quantile=1 - fpr)
        assert old > 0.8 / (n + 1) and old > 4 * fpr


def test_tail_threshold_is_consistent_for_exponential_tails():
    # Exponential scores: the excesses over the median are exactly exponential, so only the
    # estimation noise of the plug-in scale biases the FPR (upwards), and it vanishes with n.
    dist = stats.expon(0.2, 0.05)
    for fpr in (0.05, 0.01, 0.002):
        small = _mean_fpr(dist, 40, fpr, seed=3, method="tail") / fpr
        large = _mean_fpr(dist, 200, fpr, seed=3, method="tail") / fpr
        assert 0.95 < large < 1.2 and large < small < 2.2, (fpr, small, large)


def test_tail_threshold_extrapolates_beyond_the_sample_maximum():
    rng = np.random.default_rng(4)
    s = rng.gumbel(1.0, 0.1, 10)
    t05, t01 = (calibrate_threshold(s, method="tail", fpr=f) for f in (0.05, 0.01))
    assert s.max() < t05 < t01  # a lower FPR needs a higher threshold beyond the data
    # scale and shift equivariance
    assert calibrate_threshold(3 * s + 2, method="tail", fpr=0.05) == pytest.approx(3 * t05 + 2)
    # a target inside the bulk needs no tail: plain order-statistic interpolation
    assert calibrate_threshold(s, method="tail", fpr=0.6) == pytest.approx(
        np.quantile(s, 0.4, method="weibull"))


def test_auto_uses_the_distribution_free_rule_once_the_set_supports_it():
    rng = np.random.default_rng(5)
    for n, fpr, rule in ((66, 0.05, "empirical"), (39, 0.05, "empirical"), (38, 0.05, "tail"),
                         (21, 0.05, "tail"), (66, 0.01, "tail"), (199, 0.01, "empirical")):
        s = rng.gamma(3.0, 0.1, n)
        assert calibrate_threshold(s, method="auto", fpr=fpr) == calibrate_threshold(
            s, method=rule, fpr=fpr), (n, fpr)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, float("nan"), "x", True])
def test_fpr_errors_are_one_line(bad):
    with pytest.raises(ConfigError, match="fpr") as exc:
        check_fpr(bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="fpr"):
        calibrate_threshold([1.0, 2.0, 3.0, 4.0], method="tail", fpr=bad)


def test_threshold_method_errors():
    with pytest.raises(ConfigError, match="needs at least 19"):
        calibrate_threshold(np.arange(10.0), method="empirical", fpr=0.05)
    assert calibrate_threshold(np.arange(19.0), method="empirical", fpr=0.05) == 18.0
    with pytest.raises(ConfigError, match="needs at least 4"):
        calibrate_threshold([1.0, 2.0, 3.0], method="tail")
    with pytest.raises(ConfigError, match="method: expected one of auto, tail"):
        calibrate_threshold([1.0, 2.0], method="median")
