"""Uniform vs criticality-stratified sampling: per-layer CFR at the same margin.

For every weight layer of RUN (or ``--layers``) at margin e (``--error``, default 1 %) and
``--confidence`` (default 99 %): the uniform plan (Leveugle, p = 0.5, as ``campaign run
--strata layer``) and the criticality-stratified design (audit, allocation, then sequential
top-ups until the stratified margin is at most e, as ``campaign run --sampling stratified
--refine``), both evaluated exactly with the run's Engine. Prints the simulated faults and
wall time of each, their ratio (target >= 10x) and the two CFR tables side by side, which
must agree within their intervals. ``--limit K`` runs at most K faults of each uniform layer
(a uniform subsample of its plan: its interval is then wider) and extrapolates the time;
``--layers`` keeps a run short.

    PYTHONPATH=src python benchmarks/bench_stratified.py runs/magnetic_tile --images 64 \\
        --layers encoder.0,decoder.16 --limit 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from _emit import command


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory")
    ap.add_argument("--layers", default=None, help="comma list of layers (default: all)")
    ap.add_argument("--limit", type=int, default=None,
                    help="run at most K faults of each uniform layer and extrapolate")
    ap.add_argument("--images", type=int, default=None, help="test images (default all)")
    ap.add_argument("--error", type=float, default=0.01)
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--criterion", default="accuracy-drop:0.01")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-phase", action="store_true",
                    help="stratified: audit + one allocation round only (no top-ups)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from flipguard.campaign.planner import PlanConfig, make_plan
    from flipguard.campaign.stats import stratified
    from flipguard.campaign.substrata import run_stratified
    from flipguard.faults import Fault
    from flipguard.inject import parse_criterion
    from flipguard.study.engines import RunEngineFactory
    from flipguard.study.predictors import predictor_for_run

    layers = tuple(args.layers.split(",")) if args.layers else None
    factory = RunEngineFactory(args.run, images=args.images)
    t0 = time.perf_counter()
    engine = factory()
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = predictor_for_run(args.run, args.images, args.criterion, layers=layers)
    predictor_s = time.perf_counter() - t0
    crit = parse_criterion(args.criterion)
    cfg = PlanConfig(strata="layer", error=args.error, confidence=args.confidence,
                     layers=layers, seed=args.seed)
    plan = make_plan(factory.model(), cfg)
    faults = plan.faults()
    rows = []

    def evaluate(fs: list[Fault]) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        out = np.array([crit.is_critical(o, engine.golden) for o in engine.run(fs)], bool)
        return out, time.perf_counter() - t

    for s in plan.strata:
        uni = [pf.fault for pf in faults if pf.stratum == s.key]
        if args.limit is not None and args.limit < len(uni):  # a uniform subsample
            pick = np.random.default_rng([args.seed, 1]).choice(len(uni), args.limit, False)
            uni = [uni[i] for i in np.sort(pick)]
        u_crit, u_s = evaluate(uni)
        u = stratified([(s.N, len(uni), int(u_crit.sum()))], args.confidence, "wilson")
        u_full_s = u_s * s.n / len(uni)
        classes = pred.classes(s.layer, target=s.target)
        spent = [0.0]

        def run_faults(j: np.ndarray, s=s, spent=spent) -> np.ndarray:
            idx, bits = plan.space.decode(s.layer, j, target=s.target)
            out, dt = evaluate([Fault(s.target, s.layer, int(i), (int(b),))
                                for i, b in zip(idx.tolist(), bits.tolist(), strict=True)])
            spent[0] += dt
            return out

        st = run_stratified(classes, run_faults, error=args.error, confidence=args.confidence,
                            seed=args.seed, key=s.key, sequential=not args.two_phase)
        e = st.estimate
        rows.append({
            "layer": s.layer, "N": s.N, "uniform_n": s.n, "uniform_ran": len(uni),
            "uniform_s": round(u_full_s, 2), "uniform_cfr": u.p, "uniform_ci": list(u.ci),
            "stratified_n": st.total, "stratified_s": round(spent[0], 2),
            "stratified_cfr": e.p, "stratified_ci": list(e.ci), "stratified_margin": e.margin,
            "rounds": st.rounds, "ratio_n": s.n / st.total,
            "ratio_s": u_full_s / spent[0] if spent[0] > 0 else None,
            "agree": bool(u.ci[0] <= e.ci[1] and e.ci[0] <= u.ci[1]),
            "classes": {h: n for h, n in enumerate(st.N) if n}})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress, one per layer
    tot_u, tot_s = sum(r["uniform_n"] for r in rows), sum(r["stratified_n"] for r in rows)
    time_u, time_s = sum(r["uniform_s"] for r in rows), sum(r["stratified_s"] for r in rows)
    summary = {"run": args.run, "images": engine.n, "error": args.error,
               "confidence": args.confidence, "criterion": args.criterion,
               "setup_s": round(setup_s, 2), "predictor_s": round(predictor_s, 2),
               "uniform_faults": tot_u, "stratified_faults": tot_s,
               "ratio_faults": tot_u / max(tot_s, 1), "uniform_s": round(time_u, 1),
               "stratified_s": round(time_s + predictor_s, 1),
               "ratio_time": time_u / max(time_s + predictor_s, 1e-9),
               "all_agree": all(r["agree"] for r in rows), "layers": rows,
               "command": command("bench_stratified.py", argv, prefix="PYTHONPATH=src ")}
    if args.json:
        print(json.dumps(summary, indent=2))
        return summary
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    print(f"# Uniform vs criticality-stratified sampling ({args.run}, {engine.n} images)\n")
    print(f"e = {args.error:g}, confidence {args.confidence:g}, {args.criterion}; predictor "
          f"{predictor_s:.1f} s (cached per model and data), engine set-up {setup_s:.1f} s\n")
    print("| layer | N | uniform n | uniform s | stratified n | stratified s | ratio n "
          "| ratio s | uniform CFR % [CI] | stratified CFR % [CI] | agree |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|:-:|")
    for r in rows:
        ran = "" if r["uniform_ran"] == r["uniform_n"] else f" ({r['uniform_ran']} run)"
        rs = f"{r['ratio_s']:.1f}x" if r["ratio_s"] else "-"
        print(f"| {r['layer']} | {r['N']:,} | {r['uniform_n']:,}{ran} | {r['uniform_s']:.1f} "
              f"| {r['stratified_n']:,} | {r['stratified_s']:.1f} | {r['ratio_n']:.1f}x | {rs} "
              f"| {pct(r['uniform_cfr'])} [{pct(r['uniform_ci'][0])}, {pct(r['uniform_ci'][1])}]"
              f" | {pct(r['stratified_cfr'])} [{pct(r['stratified_ci'][0])}, "
              f"{pct(r['stratified_ci'][1])}] | {'yes' if r['agree'] else 'NO'} |")
    print(f"| **total** | | **{tot_u:,}** | **{time_u:.1f}** | **{tot_s:,}** | "
          f"**{summary['stratified_s']:.1f}** | **{summary['ratio_faults']:.1f}x** | "
          f"**{summary['ratio_time']:.1f}x** | | | {'yes' if summary['all_agree'] else 'NO'} |")
    print(f"\nuniform times are extrapolated from the faults run when --limit is below the "
          f"plan; the stratified time includes the predictor.\n\n`{summary['command']}`")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
