"""Coverage of the combined intervals: CFR in the layer-wise Leveugle design (issue 14).

Suite ``cfr``: the default CAE on Magnetic-Tile (18 conv layers, 512 to 204,800 weights)
planned like ``campaign run --strata layer --error 0.05 --confidence 0.95`` (376-385 faults
per layer, p = 0.5). Each replication draws every layer's critical faults without replacement
from a fixed finite population (numpy hypergeometric); per-bit rows draw the layer sample's
share of a (layer, bit) cell, then the criticals inside it. Every scenario is scored for the
old interval (Korn–Graubard ``n_eff = p q / var`` truncated at ``n``, unsampled strata
dropped; re-implemented below) and the shipped :func:`flipguard.campaign.stats.stratified`,
each with Wilson and Clopper–Pearson; ``--candidates`` adds the two alternatives the audit
measured (MOVER on per-stratum Clopper–Pearson, the design size ``1 / sum W^2 fpc / n``).

Suites ``ra`` and ``topup`` come from ``benchmarks/coverage_ra.py`` and
``benchmarks/coverage_topup.py`` when present (``scenarios(replications, seed)`` -> rows).

    PYTHONPATH=src python benchmarks/bench_coverage.py --suite cfr --replications 20000
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence

import numpy as np
from _emit import command, emit

from flipguard.campaign.stats import interval, mover, stratified

SUITES = ("cfr", "ra", "topup")
Cells = Sequence[tuple[int, int, int]]
Interval = Callable[[Cells, float, str], tuple[float, float]]


def old_interval(cells: Cells, confidence: float, method: str) -> tuple[float, float]:
    """The pre-issue-14 rule: Korn–Graubard size truncated at n, unsampled strata dropped."""
    used = [(N, n, k) for N, n, k in cells if n > 0 and N > 0]
    if not used:
        return (0.0, 1.0)
    Nu, n_all = sum(c[0] for c in used), sum(c[1] for c in used)
    p = var = inv = 0.0
    for N, n, k in used:
        w, ph, f = N / Nu, k / n, max(0.0, (N - n) / (N - 1)) if N > 1 else 1.0
        p, var, inv = p + w * ph, var + w * w * f * ph * (1 - ph) / n, inv + w * w * f / n
    if inv <= 0.0:
        return (p, p)
    if len(used) == 1:
        return interval(used[0][2], used[0][1], confidence, method, N=used[0][0])
    n_eff = min(p * (1 - p) / var if var > 0 else 1.0 / inv, float(n_all))
    return interval(p * n_eff, n_eff, confidence, method)


def new_interval(cells: Cells, confidence: float, method: str) -> tuple[float, float]:
    return stratified(cells, confidence, method).ci


def mover_cp(cells: Cells, confidence: float, method: str) -> tuple[float, float]:
    """Candidate: MOVER over per-stratum Clopper–Pearson intervals with FPC."""
    used = [(N, n, k) for N, n, k in cells if n > 0 and N > 0]
    Nu = sum(c[0] for c in used)
    return mover([(N / Nu, k / n, *interval(k, n, confidence, "clopper-pearson", N=N))
                  for N, n, k in used])


def design_only(cells: Cells, confidence: float, method: str) -> tuple[float, float]:
    """Candidate: Wilson at the design size ``1 / sum W^2 fpc / n`` alone."""
    used = [(N, n, k) for N, n, k in cells if n > 0 and N > 0]
    Nu = sum(c[0] for c in used)
    p = sum(N / Nu * k / n for N, n, k in used)
    inv = sum((N / Nu) ** 2 * max(0.0, (N - n) / (N - 1)) / n for N, n, k in used)
    return (p, p) if inv <= 0 else interval(p / inv, 1.0 / inv, confidence, "wilson")


ESTIMATORS: dict[str, tuple[Interval, str]] = {
    "old Korn–Graubard, wilson": (old_interval, "wilson"),
    "old Korn–Graubard, clopper-pearson": (old_interval, "clopper-pearson"),
    "new, wilson": (new_interval, "wilson"),
    "new, clopper-pearson": (new_interval, "clopper-pearson"),
}
CANDIDATES: dict[str, tuple[Interval, str]] = {
    "candidate MOVER on per-stratum CP": (mover_cp, "clopper-pearson"),
    "candidate design n_eff, wilson": (design_only, "wilson"),
}


def cae_design() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, n, weights) per layer of the default CAE's layer-wise e = 5 %, 95 % plan."""
    import torch

    from flipguard.campaign.planner import PlanConfig, make_plan
    from flipguard.models import CAEConfig, build_cae

    torch.set_num_threads(1)
    plan = make_plan(build_cae(CAEConfig(input_size=128, channels=1)),
                     PlanConfig(strata="layer", error=0.05, confidence=0.95))
    return (np.array([s.N for s in plan.strata]), np.array([s.n for s in plan.strata]),
            np.array([s.elements for s in plan.strata]))


def _layer(N, n, rates, R, rng):
    K = np.round(np.asarray(rates) * N).astype(np.int64)
    k = rng.hypergeometric(K, N - K, n, size=(R, len(N)))
    return np.broadcast_to(N, k.shape), np.broadcast_to(n, k.shape), k, K.sum() / N.sum()


def _bit(N, n, E, rates, R, rng):
    K = np.round(np.asarray(rates) * E).astype(np.int64)
    nc = rng.hypergeometric(E, N - E, n, size=(R, len(N)))
    k = rng.hypergeometric(np.broadcast_to(K, nc.shape), np.broadcast_to(E - K, nc.shape), nc)
    return np.broadcast_to(E, k.shape), nc, k, K.sum() / E.sum()


def static_scenarios(N, n, E) -> list[tuple[str, Callable]]:
    H = len(N)
    end = np.full(H, 0.001)
    end[[0, -1]] = 0.05
    heavy = np.zeros(H)
    heavy[8] = 0.01
    three = np.zeros(H)
    three[[5, 9, 12]] = 0.005
    anyflip = np.array([18.6, 10.9, 9.4, 5.2, 5.7, 5.2, 4.2, 5.2, 4.4, 2.9, 6.3, 3.4, 4.7, 2.6,
                        5.2, 4.2, 3.7, 10.9]) / 100  # BENCHMARKS §3 per-layer any-flip rates
    bit30 = np.array([1, 1, 1, 3, 2, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0]) / 12  # §3 counts
    mixed = np.where(np.arange(H) % 3 == 0, 0.9, 1.0)
    part_n = np.array([32] * 12 + [0] * (H - 12))
    part_r = np.array([0.002] * 12 + [1.0] * (H - 12))
    eq_N, eq_n = np.full(18, 20000), np.full(18, 97)
    return [
        ("network, p = 0.2 % in every layer", lambda R, g: _layer(N, n, np.full(H, .002), R, g)),
        ("network, end layers 5 %, the rest 0.1 %", lambda R, g: _layer(N, n, end, R, g)),
        ("network, heavy-rare: encoder.16 at 1 %, the rest 0",
         lambda R, g: _layer(N, n, heavy, R, g)),
        ("network, heavy-rare: 3 large layers at 0.5 %, the rest 0",
         lambda R, g: _layer(N, n, three, R, g)),
        ("network, any-flip-like rates 2.6-18.6 %", lambda R, g: _layer(N, n, anyflip, R, g)),
        ("bit-30 row, accuracy-drop-like rates 0-25 % (18 cells, ~12 draws each)",
         lambda R, g: _bit(N, n, E, bit30, R, g)),
        ("bit-30 row, any-flip-like rates 90 / 100 %", lambda R, g: _bit(N, n, E, mixed, R, g)),
        ("partial: 12 of 18 layers x 32 faults, unsampled layers all critical",
         lambda R, g: _layer(N, part_n, part_r, R, g)),
        ("equal strata 18 x 20,000, n = 97, p = 0.3 %",
         lambda R, g: _layer(eq_N, eq_n, np.full(18, 0.003), R, g)),
    ]


def _score(fn: Interval, method: str, Ns, ns, ks, truth, conf) -> tuple[float, float]:
    hits, width = 0, 0.0
    for Nr, nr, kr in zip(Ns.tolist(), ns.tolist(), ks.tolist(), strict=True):
        lo, hi = fn(list(zip(Nr, nr, kr, strict=True)), conf, method)
        hits += lo <= truth <= hi
        width += hi - lo
    return hits / len(ks), width / len(ks)


def sequential(N, n_plan, R, rng, conf, estimators, target=0.0015, rate=0.002):
    """Rounds of 32 faults per layer; stop once the interval is within ±target."""
    K = np.round(np.full(len(N), rate) * N).astype(np.int64)
    k, n, hist = np.zeros((R, len(N)), np.int64), np.zeros(len(N), np.int64), []
    while not hist or (n < n_plan).any():
        step = np.minimum(n_plan, n + 32) - n
        k = k + rng.hypergeometric(K - k, N - n - (K - k), np.broadcast_to(step, k.shape))
        n = n + step
        hist.append((n.tolist(), k.tolist()))
    truth, out = K.sum() / N.sum(), {}
    for name, (fn, method) in estimators.items():
        hits, width, spent = 0, 0.0, 0
        for r in range(R):
            for i, (nr, kr) in enumerate(hist):
                cells = list(zip(N.tolist(), nr, kr[r], strict=True))
                lo, hi = fn(cells, conf, method)
                p = sum(a / N.sum() * c / b for a, b, c in cells)
                if i == len(hist) - 1 or max(hi - p, p - lo) <= target:
                    hits, width = hits + (lo <= truth <= hi), width + hi - lo
                    spent += sum(nr)
                    break
        out[name] = (hits / R, width / R, spent / R)
    return truth, out


def cfr_rows(R: int, seed: int, conf: float, candidates: bool) -> list[dict]:
    N, n, E = cae_design()
    est = {**ESTIMATORS, **(CANDIDATES if candidates else {})}
    rows = []

    def add(scenario, truth, results, extra=""):
        base = {m: results[name][1] for name, (_, m) in ESTIMATORS.items()
                if name.startswith("old")}
        for name, (c, w, *more) in results.items():
            ref = base.get(est[name][1])
            note = f"true CFR {100 * truth:.3f} %"
            if ref and not name.startswith("old"):
                note += f", width x{w / ref:.2f} of old"
            if more:
                note += f", mean faults {more[0]:,.0f}"
            rows.append({"suite": "cfr", "scenario": scenario + extra, "estimator": name,
                         "R": R, "coverage": c, "se": math.sqrt(c * (1 - c) / R),
                         "mean_width": w, "note": note})

    for i, (name, draw) in enumerate(static_scenarios(N, n, E)):
        Ns, ns, ks, truth = draw(R, np.random.default_rng([seed, i]))
        # the candidates address the combination only, not unsampled strata
        use = ESTIMATORS if name.startswith("partial") else est
        add(name, truth, {e: _score(fn, m, Ns, ns, ks, truth, conf)
                          for e, (fn, m) in use.items()})
        print(f"cfr: {name} done", file=sys.stderr, flush=True)
    truth, res = sequential(N, n, R, np.random.default_rng([seed, 99]), conf, est)
    add("sequential stopping: p = 0.2 %, stop at ±0.15 pp (rounds of 32 per layer)", truth, res)
    return rows


def other_suite(name: str, R: int, seed: int) -> tuple[list[dict], str | None]:
    try:
        mod = importlib.import_module(f"coverage_{name}")
    except ImportError as exc:
        return [], f"suite {name}: benchmarks/coverage_{name}.py not available ({exc})"
    return [dict(r, suite=r.get("suite", name)) for r in mod.scenarios(R, seed)], None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default=",".join(SUITES), help="comma list of cfr, ra, topup")
    ap.add_argument("--replications", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--confidence", type=float, default=0.95, help="cfr suite level")
    ap.add_argument("--candidates", action="store_true",
                    help="cfr: also score MOVER-CP and the design-only size")
    ap.add_argument("--save", default=None, help="write the summary JSON here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = ap.parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    bad = [s for s in suites if s not in SUITES]
    if bad or args.replications < 1:
        ap.error(f"--suite: expected a comma list of {', '.join(SUITES)}; --replications >= 1")
    rows, missing = [], []
    for s in suites:
        if s == "cfr":
            rows += cfr_rows(args.replications, args.seed, args.confidence, args.candidates)
        else:
            got, why = other_suite(s, args.replications, args.seed)
            rows += got
            missing += [why] if why else []
    cmd = command("bench_coverage.py", argv, prefix="PYTHONPATH=src ")
    summary = {"suites": suites, "replications": args.replications, "seed": args.seed,
               "rows": rows, "missing": missing, "command": cmd}

    def text() -> str:
        out = ["| suite | scenario | estimator | R | coverage % ± 1.96 s.e. | mean width | note |",
               "|---|---|---|---:|---|---:|---|"]
        for r in rows:
            out.append(f"| {r['suite']} | {r['scenario']} | {r['estimator']} | {r['R']:,} | "
                       f"{100 * r['coverage']:.1f} ± {196 * r['se']:.1f} | "
                       f"{r['mean_width']:.4g} | {r.get('note', '')} |")
        out += [""] + [f"missing: {m}" for m in missing] + ["", f"`{cmd}`"]
        return "\n".join(out)

    return emit(summary, args.save, args.json, text)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
