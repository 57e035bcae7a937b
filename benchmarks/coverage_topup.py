"""Bias and coverage of criticality-stratified CFR estimates with sequential top-ups.

Populations (:data:`SCENARIOS`): one planned stratum split into five predicted classes of
very unequal sizes, the "harmless" class at a few tenths of a percent, the others a few
percent and more (an imperfect predictor), each fault's outcome fixed (a finite population,
enumerated: the exact CFR is known). Each scenario runs ``R`` seeded campaigns of the
sequential design of ``campaign run --sampling stratified`` (audit, allocation, top-ups, at
most 4 rounds after the audit) with

* ``old: pooled top-ups`` — the previous ``run_stratified`` / ``refine_stratified``: top-ups
  until the margin is reached, the rounds after the audit pooled (:func:`old_design`);
* ``new: weighted rounds`` — the current :func:`flipguard.criticality.run_stratified`
  (``sequential=True, max_rounds=4``): rounds weighted before they are drawn, a closing round
  announced in advance (:mod:`flipguard.campaign.sequential`).

It reports the bias of the point estimate (mean minus exact CFR, with its s.e.
``sd / sqrt(R)``), how often the interval covers the exact CFR (± 1.96 s.e., the s.e. from
``(k + 1) / (R + 2)``), its mean width, the mean number of simulated faults and how often the
target margin was reached. ``scenarios(R, seed)`` returns the rows (``suite="topup"``) for
``benchmarks/bench_coverage.py``; run alone:

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/coverage_topup.py --replications 2000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SCENARIOS = {  # name: (class sizes, class rates, margin, confidence)
    "rare 0.3 %, e = 0.1 %": ((200_000, 20_000, 3_000, 800, 200),
                              (0.003, 0.006, 0.02, 0.05, 0.2), 0.001, 0.95),
    "rare 0.3 %, e = 0.2 %": ((50_000, 5_000, 500, 300, 100),
                              (0.003, 0.01, 0.04, 0.1, 0.6), 0.002, 0.95),
    "loose (layer-like), e = 1 %": ((100_000, 20_000, 2_000, 1_000, 500),
                                    (0.002, 0.01, 0.05, 0.2, 0.5), 0.01, 0.99),
}
PRIORS = (0.002, 0.02, 0.2, 0.6, 0.95)  # flipguard.criticality.CLASS_PRIORS
MAX_ROUNDS = 4  # refine_stratified: round 1 plus at most 3 more


def population(sizes: Sequence[int], rates: Sequence[float], seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and outcome of every fault: ``round(N_h rate_h)`` critical per class,
    at seeded random positions."""
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(len(sizes)), sizes)
    truth = np.concatenate([rng.permutation(np.arange(n) < round(n * q))
                            for n, q in zip(sizes, rates, strict=True)])
    return classes, truth


def old_design(classes: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray], *,
               error: float, confidence: float, seed: int, key: str,
               max_rounds: int = MAX_ROUNDS, audit: int = 30,
               priors: Sequence[float] = PRIORS) -> tuple[float, tuple[float, float], int]:
    """The previous sequential design (as ``run_stratified`` / ``refine_stratified`` were):
    after the audit, allocation and top-ups until the margin of the pooled estimator is at
    most ``error``. Returns ``(p, ci, faults)``."""
    from flipguard.campaign.substrata import (
        Cell,
        allocate,
        cell_interval,
        draw,
        estimate,
        plan_rates,
        substratum_key,
    )

    H = len(priors)
    N = np.bincount(classes, minlength=H)
    pri = np.asarray(priors, dtype=np.float64)
    n0, k0, n, k = (np.zeros(H, np.int64) for _ in range(4))
    drawn: dict[int, list[np.ndarray]] = {h: [] for h in range(H)}

    def run(h: int, m: int, rnd: int) -> None:
        kk, jj = draw(classes, h, m, seed, substratum_key(key, h), rnd,
                      exclude=np.concatenate(drawn[h]) if drawn[h] else ())
        drawn[h].append(kk)
        crit = int(np.asarray(evaluate(jj), dtype=bool).sum())
        if rnd == 0:
            n0[h], k0[h] = len(jj), crit
        else:
            n[h], k[h] = n[h] + len(jj), k[h] + crit

    def est() -> Any:
        return estimate([Cell(*c) for c in zip(N, n, k, n0, k0, strict=True)], confidence)

    for h in np.flatnonzero(N):
        run(h, int(min(N[h], audit)), 0)
    e = est()
    for rnd in range(1, max_rounds + 1):
        if (n0 + n >= N).all() or (rnd > 1 and e.margin <= error):
            break
        target = allocate(N, plan_rates(n0 + n, k0 + k, pri), error, confidence, audit, n, n0)
        if (target <= n).all():  # predicted done but not achieved: grow the widest cell
            width = [c.N * (lambda t: t[2] - t[1])(cell_interval(c, confidence))
                     if c.n0 + c.n < c.N else -1.0
                     for c in (Cell(*v) for v in zip(N, n, k, n0, k0, strict=True))]
            h = int(np.argmax(width))
            target[h] = min(N[h] - n0[h], n[h] + max(1, math.ceil(0.25 * n[h])))
        for h in np.flatnonzero(target > n):
            run(int(h), int(target[h] - n[h]), rnd)
        e = est()
    return e.p, e.ci, int(n0.sum() + n.sum())


def new_design(classes: np.ndarray, evaluate: Callable[[np.ndarray], np.ndarray], *,
               error: float, confidence: float, seed: int, key: str
               ) -> tuple[float, tuple[float, float], int]:
    """The current sequential design (``run_stratified(sequential=True)``)."""
    from flipguard.campaign.substrata import run_stratified

    r = run_stratified(classes, evaluate, error=error, confidence=confidence, seed=seed,
                       key=key, sequential=True, max_rounds=MAX_ROUNDS, priors=PRIORS)
    return r.estimate.p, r.estimate.ci, r.total


DESIGNS = {"old: pooled top-ups": old_design, "new: weighted rounds": new_design}


def run_scenario(name: str, design: str, replications: int, seed: int = 0) -> dict[str, Any]:
    """Bias, coverage, width, faults and margins of ``design`` over ``replications`` seeds."""
    sizes, rates, error, conf = SCENARIOS[name]
    classes, truth = population(sizes, rates, seed)
    exact = float(truth.mean())
    out = [DESIGNS[design](classes, lambda j: truth[j], error=error, confidence=conf,
                           seed=seed * 1_000_003 + s, key=name) for s in range(replications)]
    p = np.array([o[0] for o in out])
    lo, hi = (np.array([o[1][i] for o in out]) for i in (0, 1))
    covered = int(((lo <= exact) & (exact <= hi)).sum())
    c = (covered + 1) / (replications + 2)
    margin = np.maximum(hi - p, p - lo)
    return {"coverage": covered / replications, "se": math.sqrt(c * (1 - c) / replications),
            "mean_width": float((hi - lo).mean()), "bias": float(p.mean() - exact),
            "bias_se": float(p.std(ddof=1) / math.sqrt(replications)), "exact": exact,
            "faults": float(np.mean([o[2] for o in out])),
            "reached": float(np.mean(margin <= error + 1e-12)),
            "max_margin": float(margin.max() / error), "confidence": conf, "error": error}


def scenarios(replications: int, seed: int = 0,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows (``suite, scenario, estimator, R, coverage, se, mean_width, bias, bias_se,
    note``) of the old and the new estimator on every scenario."""
    rows = []
    for name in SCENARIOS:
        for design in DESIGNS:
            t0 = time.perf_counter()
            r = run_scenario(name, design, replications, seed)
            rows.append({"suite": "topup", "scenario": name, "estimator": design,
                         "R": replications, "coverage": r["coverage"], "se": r["se"],
                         "mean_width": r["mean_width"], "bias": r["bias"],
                         "bias_se": r["bias_se"],
                         "note": f"exact CFR {100 * r['exact']:.3f} %, nominal "
                                 f"{100 * r['confidence']:g} %; {r['faults']:.0f} faults on "
                                 f"average; margin <= e in {100 * r['reached']:.1f} % of "
                                 f"runs (max {r['max_margin']:.2f} e)"})
            if log:
                log(f"{name} | {design}: {time.perf_counter() - t0:.0f} s")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`scenarios` rows."""
    lines = ["| scenario | estimator | R | bias % rel (± s.e.) | bias / s.e. | coverage ± 1.96 "
             "s.e. | mean width | note |", "|---|---|---:|---:|---:|---|---:|---|"]
    for r in rows:
        sizes, rates = SCENARIOS[r["scenario"]][:2]
        exact = float(population(sizes, rates)[1].mean())
        lines.append(f"| {r['scenario']} | {r['estimator']} | {r['R']:,} | "
                     f"{100 * r['bias'] / exact:+.2f} (± {100 * r['bias_se'] / exact:.2f}) | "
                     f"{r['bias'] / r['bias_se']:+.1f} | {100 * r['coverage']:.1f} ± "
                     f"{196 * r['se']:.1f} % | {100 * r['mean_width']:.3f} % | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replications", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from _emit import command

    rows = scenarios(args.replications, args.seed, log=lambda s: print(s, file=sys.stderr))
    print(table(rows))
    print(f"\n`{command('coverage_topup.py', argv, prefix='OMP_NUM_THREADS=1 PYTHONPATH=src ')}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
