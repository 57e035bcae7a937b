"""Weighted paired comparison: exact references and coverage on synthetic paired populations
with known truth (unequal strata, rare critical faults, strata with none observed), against
the old unweighted McNemar test and paired bootstrap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from flipguard.campaign.stats import leveugle_n
from flipguard.harden import pairstats
from flipguard.harden.paired import paired_bootstrap
from flipguard.harden.pairstats import (
    PairCell,
    compare_paired,
    difference_interval,
    difference_p_value,
    improvement_interval,
    pair_cells,
    sign_flip_test,
)


def rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def test_pair_cells_and_point_estimates_match_brute_force() -> None:
    g = rng(0)
    keys = ["a"] * 40 + ["b"] * 25 + ["c"] * 60
    b = g.random(125) < 0.3
    a = (b & (g.random(125) < 0.4)) | (g.random(125) < 0.05)
    N = {"a": 400, "b": 5000, "c": 900, "d": 700}  # d: never sampled
    cells = pair_cells(b, a, keys, N)
    assert [c.n for c in cells] == [40, 25, 60, 0]
    for c, k in zip(cells[:3], "abc", strict=True):
        sel = np.array(keys) == k
        assert (c.n10, c.n11, c.n01) == (int((b & ~a)[sel].sum()), int((b & a)[sel].sum()),
                                         int((~b & a)[sel].sum()))
    r = compare_paired(cells, n_mc=2000)
    w = {k: N[k] / 6300 for k in "abc"}
    pb = sum(w[k] * b[np.array(keys) == k].mean() for k in "abc")
    pa = sum(w[k] * a[np.array(keys) == k].mean() for k in "abc")
    assert r.cfr_before == pytest.approx(pb) and r.cfr_after == pytest.approx(pa)
    assert r.relative_improvement == pytest.approx(1 - pa / pb)
    assert r.unsampled_share == pytest.approx(700 / 7000)
    assert r.difference_ci[0] < r.difference < r.difference_ci[1]


def test_sign_flip_exact_equals_enumeration_of_all_sign_patterns() -> None:
    cells = [PairCell(1000, 10, 5, 1, 3, 1), PairCell(50_000, 20, 16, 2, 2, 0),
             PairCell(7000, 8, 5, 0, 3, 0)]
    w = np.array([1000, 50_000, 7000]) / 58_000
    coef = np.repeat(w / np.array([10, 20, 8]), [4, 4, 3])  # one entry per discordant pair
    t = (w / np.array([10, 20, 8]) * np.array([3 - 1, 2 - 2, 3 - 0])).sum()
    hits = sum(abs((coef * np.array(s)).sum()) >= abs(t) - 1e-15
               for s in itertools.product((-1, 1), repeat=coef.size))
    p, how = sign_flip_test(cells)
    assert how == "exact" and p == pytest.approx(hits / 2 ** coef.size)
    # Monte Carlo path (support cap lowered): within 4 standard errors of the exact value
    old, pairstats.EXACT_SUPPORT = pairstats.EXACT_SUPPORT, 2
    try:
        pm, how_m = sign_flip_test(cells, n_mc=40_000, seed=1)
    finally:
        pairstats.EXACT_SUPPORT = old
    assert how_m == "monte-carlo" and abs(pm - p) < 4 * math.sqrt(p * (1 - p) / 40_000)
    # one stratum: the exact McNemar test
    one = [PairCell(100, 30, 20, 2, 7, 1)]
    assert sign_flip_test(one)[0] == pytest.approx(binomtest(7, 9, 0.5).pvalue)


def test_interval_ends_and_the_test_agree_with_the_interval() -> None:
    all_fixed = [PairCell(10_000, 100, 90, 0, 10, 0), PairCell(2000, 50, 50, 0, 0, 0)]
    lo, hi = improvement_interval(all_fixed)
    assert hi == 1.0 and 0.0 < lo < 1.0  # nothing left after: R = 1 cannot be excluded
    g = rng(3)
    for _ in range(40):
        cells = []
        for N, n in ((50_000, 80), (8000, 60), (900, 40)):
            p01, p10 = g.uniform(0, 0.04), g.uniform(0, 0.1)
            x = g.multinomial(n, [1 - p01 - p10 - 0.02, p01, p10, 0.02])
            cells.append(PairCell(N, n, *map(int, x)))
        r = compare_paired(cells, n_mc=2000)
        if not r.cfr_before > 0:
            continue
        assert r.ci[0] <= r.relative_improvement <= r.ci[1] <= 1.0
        # p < 5 % exactly when the 95 % intervals of D and of R exclude 0
        assert (r.p_value < 0.05) == (r.difference_ci[0] > 0 or r.difference_ci[1] < 0)
        assert (r.difference_ci[0] > 0) == (r.ci[0] > 0)
    # D's interval reduces to exact per-part distances for one stratum
    c = [PairCell(10**9, 200, 185, 0, 15, 0)]
    from scipy.special import betaincinv
    f = 15 / 200
    lo_f = betaincinv(15, 186, 0.025)
    hi_k = betaincinv(1, 200, 0.975)
    assert difference_interval(c)[0] == pytest.approx(f - math.hypot(f - lo_f, hi_k), rel=1e-4)
    assert difference_p_value([PairCell(100, 10, 10, 0, 0, 0)]) == 1.0


# --- synthetic paired populations with known truth ------------------------------------

def fixed_population() -> tuple[np.ndarray, ...]:
    """Unequal strata (Leveugle sizes ~ constant, weights over 3 orders of magnitude), rare
    critical faults, a residue the hardening leaves in the largest stratum and in a small
    unprotected one, a stratum with none at all."""
    N = np.array([600_000, 600_000, 300_000, 300_000, 150_000, 75_000, 9000, 2000])
    pb = np.array([0.04, 0.045, 0.04, 0.05, 0.035, 0.06, 0.003, 0.0])
    keep = np.array([0.002, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # share still critical
    crit = np.round(N * pb).astype(int)
    c11 = np.round(crit * keep).astype(int)
    return N, np.zeros_like(N), crit - c11, c11


def sample(g: np.random.Generator, N, c01, c10, c11, n) -> list[PairCell]:
    return [PairCell(int(N[h]), int(n[h]), *map(int, g.multivariate_hypergeometric(
        [N[h] - c01[h] - c10[h] - c11[h], c01[h], c10[h], c11[h]], int(n[h]))))
        for h in range(N.size)]


def bootstrap_of(cells: list[PairCell], seed: int) -> tuple[float, float]:
    """The old interval: stratified paired bootstrap of per-fault arrays."""
    b, a, keys = [], [], []
    for i, c in enumerate(cells):
        for (bb, aa), k in (((0, 0), c.n00), ((0, 1), c.n01), ((1, 0), c.n10), ((1, 1), c.n11)):
            b += [bb] * k
            a += [aa] * k
            keys += [str(i)] * k
    N = {str(i): c.N for i, c in enumerate(cells)}
    return paired_bootstrap(np.array(b), np.array(a), keys, N, n_boot=200, seed=seed)[1]


def test_coverage_fixed_plan_new_holds_old_bootstrap_fails() -> None:
    N, c01, c10, c11 = fixed_population()
    truth = 1 - (c11 + c01).sum() / (c10 + c11).sum()
    n = np.array([leveugle_n(int(x), 0.05, 0.95) for x in N])
    g = rng(11)
    new = old = 0
    reps = 500
    for i in range(reps):
        cells = sample(g, N, c01, c10, c11, n)
        lo, hi = improvement_interval(cells)
        new += lo <= truth <= hi
        blo, bhi = bootstrap_of(cells, i)
        old += blo <= truth <= bhi
    assert new / reps >= 0.94, f"coverage {new / reps:.3f}"  # nominal 95 % - 1 pp
    # the bootstrap never sees the rare residue: [1, 1] often
    assert old / reps < 0.80, f"bootstrap coverage {old / reps:.3f}"


def test_coverage_plan_fitted_on_the_same_sample() -> None:
    """The planner's case: protect every (stratum, bit) cell where a critical fault was
    sampled, evaluate on the same faults. Critical cells nobody sampled stay unprotected."""
    g = rng(5)
    Nw = np.array([60_000, 60_000, 30_000, 30_000, 15_000, 15_000, 7500, 3700, 1800, 900])
    p = np.zeros((Nw.size, 32))
    p[:, 30] = 0.9
    p[:, 27:30] = g.choice([0, 0.02, 0.1, 0.3], size=(Nw.size, 3))
    p[:, 23:27] = g.choice([0, 0, 0.01, 0.05], size=(Nw.size, 4))
    N = Nw * 32
    W = N / N.sum()
    n = np.array([leveugle_n(int(x), 0.1, 0.95) for x in N])
    new = old = 0
    reps = 300
    for i in range(reps):
        cells, prot, crit_bits = [], np.zeros(p.shape, bool), []
        for h in range(Nw.size):
            bits = g.integers(0, 32, n[h])
            crit = g.random(n[h]) < p[h, bits]
            prot[h, np.unique(bits[crit])] = True
            crit_bits.append((bits, crit))
        for h, (bits, crit) in enumerate(crit_bits):
            after = crit & ~prot[h, bits]
            cells.append(PairCell(int(N[h]), int(n[h]), int((~crit & ~after).sum()),
                                  int((~crit & after).sum()), int((crit & ~after).sum()),
                                  int((crit & after).sum())))
        truth = 1 - (W * (p * ~prot).mean(1)).sum() / (W * p.mean(1)).sum()
        lo, hi = improvement_interval(cells)
        new += lo <= truth <= hi
        blo, bhi = bootstrap_of(cells, i)
        old += blo <= truth <= bhi
    assert new / reps >= 0.94, f"coverage {new / reps:.3f}"
    # in-sample, nothing is left after: the bootstrap says [1, 1]
    assert old / reps < 0.05, f"bootstrap coverage {old / reps:.3f}"


def test_weighted_test_holds_the_population_null_mcnemar_does_not() -> None:
    """D = 0 in the population: the heavy stratum degrades, the light one (as many pairs)
    improves. McNemar counts pairs, not population shares."""
    strata = [(8_000_000, 400, 0.01, 0.02), (2_000_000, 400, 0.06, 0.02)]  # N, n, p10, p01
    assert sum(N * (p10 - p01) for N, _, p10, p01 in strata) == pytest.approx(0.0, abs=1e-6)
    g = rng(2)
    reps, new, old = 600, 0, 0
    for _ in range(reps):
        cells = [PairCell(N, n, *map(int, g.multinomial(n, [1 - p10 - p01, p01, p10, 0])))
                 for N, n, p10, p01 in strata]
        new += difference_p_value(cells) < 0.05
        f, b = sum(c.n10 for c in cells), sum(c.n01 for c in cells)
        old += binomtest(f, f + b, 0.5).pvalue < 0.05
    assert new / reps <= 0.06, f"rejection rate {new / reps:.3f}"
    assert old / reps > 0.25, f"McNemar rejection rate {old / reps:.3f}"
