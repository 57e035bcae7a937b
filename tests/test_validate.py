"""SFI validated against exhaustive injection: the sampling shortcut is the real sampling
distribution, the coverage it reports detects a broken interval, and `validate_run` injects
every fault once (resumable) and records the exhaustive CFR exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import hypergeom

from flipguard.campaign.analysis import classify_store
from flipguard.campaign.store import CampaignStore
from flipguard.campaign.validation import validate_sfi
from flipguard.errors import ConfigError
from flipguard.inject import CRITICAL, parse_criterion
from flipguard.study.engines import RunEngineFactory
from flipguard.study.validate import ValidateOptions, store_file, validate_run


def _population(N=4096, rates=None, seed=0):
    """Bits 0..31 with per-bit critical rates (rare overall, concentrated in high bits)."""
    rng = np.random.default_rng(seed)
    bits = np.tile(np.arange(32), N // 32)
    rates = rates or {30: 0.6, 29: 0.08, 28: 0.02, 25: 0.01}
    crit = np.array([rng.random() < rates.get(int(b), 0.0) for b in bits])
    return crit, bits


def test_hypergeometric_shortcut_matches_brute_force_sampling():
    crit, bits = _population()
    N, K = crit.size, int(crit.sum())
    rows = validate_sfi(crit, None, margins=(0.05,), confidence=0.95, replications=4000)
    n = rows[0].n
    rng = np.random.default_rng(1)
    brute = np.array([crit[rng.choice(N, n, replace=False)].sum() for _ in range(1500)])
    # brute-force draws follow the same hypergeometric law the shortcut samples from
    assert abs(brute.mean() - n * K / N) < 4 * hypergeom(N, K, n).std() / np.sqrt(1500)
    assert rows[0].cfr == pytest.approx(K / N)


def test_reported_coverage_is_near_nominal_and_exposes_a_broken_interval(monkeypatch):
    crit, bits = _population()
    rows = validate_sfi(crit, bits, margins=(0.02, 0.05), confidence=0.95, replications=3000)
    layer = [r for r in rows if r.scope == "layer"]
    assert all(r.coverage >= 0.93 for r in layer)
    assert {r.scope for r in rows} == {"layer", "layer×bit", "bit"}
    per_bit = [r for r in rows if r.scope == "bit" and r.margin == 0.05]
    assert len(per_bit) == 32 and sum(r.cfr * r.N for r in per_bit) == crit.sum()

    import flipguard.campaign.validation as v

    def naive(k, n, confidence, method, N=None):  # no FPC, normal approximation, no floor
        p = k / n
        h = 1.96 * np.sqrt(p * (1 - p) / n)
        return p - h, p + h

    big, big_bits = _population(N=32768, rates={30: 0.6, 29: 0.08, 25: 0.005})
    fine = validate_sfi(big, big_bits, margins=(0.05,), confidence=0.95, replications=2000)
    monkeypatch.setattr(v, "interval", naive)
    broken = validate_sfi(big, big_bits, margins=(0.05,), confidence=0.95, replications=2000)

    def bit25(rows):
        return next(r for r in rows if r.scope == "bit" and r.key == "25").coverage

    assert bit25(fine) >= 0.93 and bit25(broken) < 0.85  # the check catches a bad interval


def test_bad_inputs():
    with pytest.raises(ConfigError, match="at least 2"):
        validate_sfi(np.zeros(1, bool))
    with pytest.raises(ConfigError, match="one bit per fault"):
        validate_sfi(np.zeros(8, bool), np.zeros(3))


def test_validate_run_is_exhaustive_and_resumable(tmp_path):
    from test_runner import make_tiny_run

    run = make_tiny_run(tmp_path)
    factory = RunEngineFactory(str(run), images=4)
    opts = ValidateOptions(layer="encoder.0", bits=(30, 23, 2), margins=(0.05, 0.1),
                           confidence=0.9, replications=200, criterion="any-flip", chunk=8)
    weights = factory.model().get_submodule("encoder.0").weight.numel()
    # a first, interrupted run: only part of the population
    with pytest.raises(KeyboardInterrupt):
        def stop(done, total):
            if done >= 20:
                raise KeyboardInterrupt
        validate_run(run, factory, opts, progress=stop)
    rec = validate_run(run, factory, opts)  # resumes
    assert rec["population"] == 3 * weights and rec["bits"] == [2, 23, 30]
    with CampaignStore(store_file(run, "encoder.0")) as store:
        assert store.counts() == {"planned": 3 * weights, "done": 3 * weights}
        res = store.results()
        keys = {(pf.fault.index, pf.fault.bits) for pf, _ in res}
        assert len(keys) == 3 * weights  # every fault exactly once
        classes = [c for _, c in classify_store(store, "any-flip")]
    assert rec["critical"] == sum(c in CRITICAL for c in classes)
    saved = json.loads(store_file(run, "encoder.0").with_suffix(".json").read_text())
    assert saved["cfr"] == pytest.approx(rec["critical"] / rec["population"])
    bit30 = [r for r in saved["rows"] if r["scope"] == "bit" and r["key"] == "30"]
    assert bit30 and all(r["N"] == weights for r in bit30)
    assert parse_criterion(saved["criterion"]).text == "any-flip"
