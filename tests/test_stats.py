"""Sample sizes (Leveugle / Cochran), intervals and stratified estimates against references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flipguard.campaign.stats import (
    allocate,
    clopper_pearson,
    interval,
    leveugle_n,
    post_hoc_margin,
    stratified,
    t_value,
    wilson,
)
from flipguard.errors import ConfigError


def cochran(N: int, e: float, t: float, p: float) -> float:
    """Cochran's textbook form n0 N / (N + n0 - 1), n0 = t^2 p q / e^2 (same quantity)."""
    n0 = t * t * p * (1 - p) / (e * e)
    return n0 * N / (N + n0 - 1)


@pytest.mark.parametrize(
    ("N", "e", "conf", "p", "expected"),
    [
        (1000, 0.05, 0.95, 0.5, 278),          # 277.74 by hand
        (100, 0.05, 0.95, 0.5, 80),            # 79.51
        (10, 0.01, 0.99, 0.5, 10),             # tiny population: n = N
        (1, 0.01, 0.99, 0.5, 1),
        (10**12, 0.01, 0.95, 0.5, 9604),       # the classic 1.96^2 / 4e-4
        (10**12, 0.05, 0.95, 0.5, 385),        # 384.15
        (10**12, 0.01, 0.99, 0.5, 16588),      # 2.5758^2 / 4e-4 = 16587.2
        (10000, 0.01, 0.95, 0.1, 2570),        # p = 0.1: 2569.4
        (10000, 0.01, 0.95, 0.9, 2570),        # symmetric in p
        (64000, 0.02, 0.99, 0.3, 3304),        # 3303.57
    ],
)
def test_leveugle_hand_values(N, e, conf, p, expected):
    assert leveugle_n(N, e, conf, p) == expected
    assert leveugle_n(N, e, conf, p) == min(N, math.ceil(cochran(N, e, t_value(conf), p)))


def test_t_values_and_rounding():
    assert t_value(0.95) == pytest.approx(1.96, abs=5e-4)
    assert t_value(0.99) == pytest.approx(2.576, abs=5e-4)
    # 9512.3 -> ceil 9513, nearest 9512
    assert leveugle_n(10**6, 0.01, 0.95) == 9513
    assert leveugle_n(10**6, 0.01, 0.95, rounding="nearest") == 9512
    assert leveugle_n(0, 0.01, 0.95) == 0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2, "x"])
def test_invalid_inputs_raise_one_line(bad):
    for call in (lambda: leveugle_n(100, bad, 0.95), lambda: leveugle_n(100, 0.01, bad),
                 lambda: leveugle_n(100, 0.01, 0.95, bad)):
        with pytest.raises(ConfigError) as exc:
            call()
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="rounding"):
        leveugle_n(100, 0.01, 0.95, rounding="floor")


def test_margin_inverts_sample_size():
    for N, e, c in [(5000, 0.02, 0.95), (123456, 0.01, 0.99), (300, 0.05, 0.9)]:
        n = leveugle_n(N, e, c)
        assert post_hoc_margin(n, N, 0.5, c) <= e + 1e-12
        assert post_hoc_margin(n - 1, N, 0.5, c) > e
    assert post_hoc_margin(50, 50, 0.3, 0.95) == 0.0  # enumerated: no sampling error


def test_known_intervals():
    # Textbook values for 5/100 at 95 %.
    assert wilson(5, 100, 0.95) == pytest.approx((0.02154, 0.11175), abs=5e-5)
    assert clopper_pearson(5, 100, 0.95) == pytest.approx((0.01643, 0.11284), abs=5e-5)
    assert clopper_pearson(0, 20, 0.95)[0] == 0.0
    assert clopper_pearson(0, 20, 0.95)[1] == pytest.approx(1 - 0.025 ** (1 / 20))
    assert interval(3, 10, 0.95, N=10) == (0.3, 0.3)


@pytest.mark.parametrize("method", ["wilson", "clopper-pearson"])
def test_interval_coverage_by_simulation(method):
    rng = np.random.default_rng(0)
    conf, n = 0.95, 120
    table = np.array([interval(k, n, conf, method) for k in range(n + 1)])
    cover = []
    for p in (0.02, 0.1, 0.3, 0.5, 0.8):
        k = rng.binomial(n, p, size=4000)
        cover.append(np.mean((table[k, 0] <= p) & (p <= table[k, 1])))
    if method == "clopper-pearson":
        assert min(cover) >= 0.94  # exact: at least nominal up to simulation noise
    else:
        assert 0.93 <= np.mean(cover) <= 0.97 and min(cover) >= 0.90


def test_fpc_interval_covers_finite_population():
    rng = np.random.default_rng(1)
    N, n, K, conf = 400, 250, 60, 0.95
    pop = np.zeros(N, dtype=bool)
    pop[:K] = True
    p = K / N
    hits, widths = 0, []
    for _ in range(1500):
        k = int(pop[rng.choice(N, n, replace=False)].sum())
        lo, hi = interval(k, n, conf, "wilson", N=N)
        hits += lo <= p <= hi
        widths.append((hi - lo) / np.subtract(*interval(k, n, conf, "wilson")[::-1]))
    assert 0.93 <= hits / 1500 <= 0.98
    assert max(widths) < 1.0  # the correction narrows the interval


def test_stratified_matches_direct_computation():
    cells = [(1000, 40, 4), (300, 30, 12), (5000, 50, 1), (20, 20, 7)]
    Nt = sum(c[0] for c in cells)
    p = sum(N / Nt * k / n for N, n, k in cells)
    var = sum((N / Nt) ** 2 * (N - n) / (N - 1) * (k / n) * (1 - k / n) / n for N, n, k in cells)
    e = stratified(cells, 0.99)
    assert e.p == pytest.approx(p) and e.var == pytest.approx(var)
    assert e.margin == pytest.approx(2.5758293 * math.sqrt(var))
    assert (e.n, e.k, e.N) == (140, 24, Nt)
    # one cell: the same as the single-proportion interval with FPC
    one = stratified([(500, 100, 13)], 0.95, "clopper-pearson")
    assert one.ci == pytest.approx(interval(13, 100, 0.95, "clopper-pearson", N=500))
    # proportional allocation is self-weighting: p_st = pooled k / n
    prop = stratified([(1000, 10, 3), (3000, 30, 6)], 0.95)
    assert prop.p == pytest.approx(9 / 40)


def test_stratified_coverage_by_simulation():
    rng = np.random.default_rng(2)
    sizes, rates, ns = [2000, 500, 800], [0.02, 0.4, 0.15], [60, 60, 60]
    pops = [rng.random(N) < r for N, r in zip(sizes, rates, strict=True)]
    truth = sum(p.sum() for p in pops) / sum(sizes)
    hits = 0
    for _ in range(800):
        cells = [(N, n, int(pop[rng.choice(N, n, replace=False)].sum()))
                 for N, n, pop in zip(sizes, ns, pops, strict=True)]
        lo, hi = stratified(cells, 0.9).ci
        hits += lo <= truth <= hi
    assert 0.86 <= hits / 800 <= 0.97  # n_eff truncated at n: a little conservative


def test_allocate_largest_remainder():
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]
    assert allocate(7, [10, 0, 30]) == [2, 0, 5]
    rng = np.random.default_rng(3)
    for _ in range(50):
        w = rng.integers(1, 1000, size=6).tolist()
        n = int(rng.integers(0, 500))
        a = allocate(n, w)
        assert sum(a) == n
        assert all(abs(ai - n * wi / sum(w)) < 1 for ai, wi in zip(a, w, strict=True))


def test_stratified_covers_rare_events_spread_over_many_strata():
    """The `cfr --by field` situation: 18 layer cells, critical faults rare, concentrated in
    a few cells or spread thinly, many cells with k = 0: the combined interval keeps the
    nominal rate (up to Wilson's small-p dips)."""
    rng = np.random.default_rng(5)
    sizes = [20000] * 18
    untruncated = []
    for rates, n in (([0.0] * 17 + [0.09], 24), ([0.003] * 18, 97), ([0.003] * 18, 24),
                     ([0.0] * 14 + [0.002, 0.01, 0.03, 0.06], 24)):
        pops = [rng.random(N) < r for N, r in zip(sizes, rates, strict=True)]
        truth = sum(p.sum() for p in pops) / sum(sizes)
        hits = old = 0
        reps = 500
        for _ in range(reps):
            cells = [(N, n, int(pop[rng.choice(N, n, replace=False)].sum()))
                     for N, pop in zip(sizes, pops, strict=True)]
            e = stratified(cells, 0.95)
            hits += e.ci[0] <= truth <= e.ci[1]
            assert e.n_eff <= e.n
            big = e.p * (1 - e.p) / e.var if e.var > 0 else e.n_eff
            lo, hi = interval(e.p * big, big, 0.95, "wilson")
            old += lo <= truth <= hi
        assert hits / reps >= 0.92, (rates, n, hits / reps)  # Wilson's small-p dips
        untruncated.append(old / reps)
    assert min(untruncated) >= 0.9  # truncation only ever widens
