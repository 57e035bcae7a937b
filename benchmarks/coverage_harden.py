"""Coverage of the hardening improvement interval and size of the paired test, by simulation.

Synthetic paired populations with known truth (unequal strata with Leveugle sample sizes,
rare critical faults, strata with none observed): the weighted MOVER-R interval of
:mod:`flipguard.harden.pairstats` against the old stratified paired bootstrap, and the
weighted test of ``D = 0`` against McNemar's (unweighted) test. Scenarios:

* ``fixed`` — a plan fixed in advance, a rare residue left in the heaviest stratum;
* ``fitted-in-sample`` — the planner's case: protect every (stratum, bit) cell where a
  critical fault was sampled, evaluate on the same faults;
* ``fitted-holdout`` — the same plans evaluated on an independent sample (the hold-out);
* ``null`` — ``D = 0`` in the population, a heavy stratum degrades and a light one improves.

    PYTHONPATH=src python benchmarks/coverage_harden.py --reps 2000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _emit import command, emit
from scipy.stats import binomtest

from flipguard.campaign.stats import leveugle_n
from flipguard.harden.paired import paired_bootstrap
from flipguard.harden.pairstats import (
    PairCell,
    difference_p_value,
    improvement_interval,
    sign_flip_test,
)


def _boot(cells: list[PairCell], seed: int) -> tuple[float, float]:
    b, a, keys = [], [], []
    for i, c in enumerate(cells):
        for (bb, aa), k in (((0, 0), c.n00), ((0, 1), c.n01), ((1, 0), c.n10), ((1, 1), c.n11)):
            b += [bb] * k
            a += [aa] * k
            keys += [str(i)] * k
    N = {str(i): c.N for i, c in enumerate(cells)}
    return paired_bootstrap(np.array(b), np.array(a), keys, N, n_boot=400, seed=seed)[1]


def _fixed(g: np.random.Generator, reps: int) -> dict:
    N = np.array([600_000, 600_000, 300_000, 300_000, 150_000, 75_000, 9000, 2000])
    pb = np.array([0.04, 0.045, 0.04, 0.05, 0.035, 0.06, 0.003, 0.0])
    keep = np.array([0.002, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    crit = np.round(N * pb).astype(int)
    c11 = np.round(crit * keep).astype(int)
    c10 = crit - c11
    truth = 1 - c11.sum() / crit.sum()
    n = np.array([leveugle_n(int(x), 0.05, 0.95) for x in N])
    hit = {"new": 0, "bootstrap": 0}
    width = {"new": 0.0, "bootstrap": 0.0}
    for i in range(reps):
        cells = [PairCell(int(N[h]), int(n[h]), *map(int, g.multivariate_hypergeometric(
            [N[h] - crit[h], 0, c10[h], c11[h]], int(n[h])))) for h in range(N.size)]
        for k, (lo, hi) in (("new", improvement_interval(cells)), ("bootstrap", _boot(cells, i))):
            hit[k] += lo <= truth <= hi
            width[k] += hi - lo
    return {k: {"coverage": hit[k] / reps, "width": width[k] / reps} for k in hit}


def _fitted(g: np.random.Generator, reps: int, e: float) -> dict:
    Nw = np.array([60_000, 60_000, 30_000, 30_000, 15_000, 15_000, 7500, 3700, 1800, 900])
    p = np.zeros((Nw.size, 32))
    p[:, 30] = 0.9
    p[:, 27:30] = g.choice([0, 0.02, 0.1, 0.3], size=(Nw.size, 3))
    p[:, 23:27] = g.choice([0, 0, 0.01, 0.05], size=(Nw.size, 4))
    N = Nw * 32
    W = N / N.sum()
    n = np.array([leveugle_n(int(x), e, 0.95) for x in N])

    def draw() -> list:
        out = []
        for h in range(Nw.size):
            bits = g.integers(0, 32, n[h])
            out.append((bits, g.random(n[h]) < p[h, bits]))
        return out

    def cells_of(sample: list, prot: np.ndarray) -> list[PairCell]:
        out = []
        for h, (bits, crit) in enumerate(sample):
            after = crit & ~prot[h, bits]
            out.append(PairCell(int(N[h]), int(n[h]), int((~crit & ~after).sum()),
                                int((~crit & after).sum()), int((crit & ~after).sum()),
                                int((crit & after).sum())))
        return out

    res = {f"{w}:{k}": [0, 0.0] for w in ("in-sample", "holdout") for k in ("new", "bootstrap")}
    for i in range(reps):
        fit = draw()
        prot = np.zeros(p.shape, bool)
        for h, (bits, crit) in enumerate(fit):
            prot[h, np.unique(bits[crit])] = True
        truth = 1 - (W * (p * ~prot).mean(1)).sum() / (W * p.mean(1)).sum()
        for where, cells in (("in-sample", cells_of(fit, prot)),
                             ("holdout", cells_of(draw(), prot))):
            for k, (lo, hi) in (("new", improvement_interval(cells)),
                                ("bootstrap", _boot(cells, i))):
                res[f"{where}:{k}"][0] += lo <= truth <= hi
                res[f"{where}:{k}"][1] += hi - lo
    return {k: {"coverage": v[0] / reps, "width": v[1] / reps} for k, v in res.items()}


def _null(g: np.random.Generator, reps: int, n_heavy: int) -> dict:
    strata = [(8_000_000, n_heavy, 0.01, 0.02), (2_000_000, 400, 0.06, 0.02)]
    rej = {"new": 0, "sign-flip": 0, "McNemar": 0}
    for _ in range(reps):
        cells = [PairCell(N, n, *map(int, g.multinomial(n, [1 - p10 - p01, p01, p10, 0])))
                 for N, n, p10, p01 in strata]
        rej["new"] += difference_p_value(cells) < 0.05
        rej["sign-flip"] += sign_flip_test(cells, n_mc=2000)[0] < 0.05
        f, b = sum(c.n10 for c in cells), sum(c.n01 for c in cells)
        rej["McNemar"] += binomtest(f, f + b, 0.5).pvalue < 0.05
    return {k: v / reps for k, v in rej.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="write the summary JSON here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    g = np.random.Generator(np.random.PCG64(args.seed))
    t0 = time.perf_counter()
    summary = {"reps": args.reps, "fixed": _fixed(g, args.reps),
               "fitted_e10": _fitted(g, args.reps, 0.1), "fitted_e05": _fitted(g, args.reps, 0.05),
               "null_n100": _null(g, args.reps, 100), "null_n400": _null(g, args.reps, 400),
               "command": command("coverage_harden.py", argv, prefix="PYTHONPATH=src ")}
    summary["seconds"] = time.perf_counter() - t0

    def text() -> str:
        lines = ["| scenario | interval | coverage (nominal 95 %) | mean width |",
                 "|---|---|---:|---:|"]
        for name, key in (("fixed plan", "fixed"), ("fitted plan, e = 10 %", "fitted_e10"),
                          ("fitted plan, e = 5 %", "fitted_e05")):
            for k, v in summary[key].items():
                where, _, m = k.rpartition(":")
                label = f"{name}{', ' + where if where else ''}"
                lines.append(f"| {label} | {m or k} | {100 * v['coverage']:.1f} % | "
                             f"{100 * v['width']:.1f} pp |")
        lines += ["", "| population null D = 0 (rejections at 5 %) | weighted test | "
                  "sign-flip (stratified McNemar) | McNemar (unweighted) |", "|---|---:|---:|---:|"]
        for name, key in (("heavy stratum n = 100", "null_n100"),
                          ("heavy stratum n = 400", "null_n400")):
            v = summary[key]
            lines.append(f"| {name} | {100 * v['new']:.1f} % | {100 * v['sign-flip']:.1f} % | "
                         f"{100 * v['McNemar']:.1f} % |")
        lines.append(f"\n{args.reps} replications each, {summary['seconds']:.0f} s. "
                     f"`{summary['command']}`")
        return "\n".join(lines)

    return emit(summary, args.save, args.json, text)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
