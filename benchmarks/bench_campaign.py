"""Campaign throughput on a run directory, and the projected cost of a seed-grade plan.

Runs a layer-wise campaign at e = 5 %, 95 % (p = 0.5) on RUN's test images into a scratch
store, reports planned faults, wall time, faults/s, CFR per layer and per bit, and projects
the time of the seed-grade plan (layer-wise, e = 1 %, 99 %) at the measured rate.
``--limit K`` runs only about K faults (whole 32-fault engine chunks spread evenly over the
plan, so every layer is timed) and extrapolates.

    PYTHONPATH=src python benchmarks/bench_campaign.py runs/demo --limit 500 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory")
    ap.add_argument("--limit", type=int, default=None, help="run at most K faults")
    ap.add_argument("--workers", type=int, default=1, help="local worker processes")
    ap.add_argument("--images", type=int, default=None, help="test images (default all)")
    ap.add_argument("--criterion", default="accuracy-drop:0.01")
    ap.add_argument("--store", default=None, help="store path (default: a temp file)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from flipguard.campaign.analysis import cfr_table
    from flipguard.campaign.planner import PlanConfig, make_plan
    from flipguard.campaign.runner import (
        chunks_of,
        ensure_golden,
        open_campaign,
        run_campaign,
    )
    from flipguard.study.engines import RunEngineFactory

    factory = RunEngineFactory(args.run, images=args.images)
    model = factory.model()
    cfg = PlanConfig(strata="layer", error=0.05, confidence=0.95)
    seed_grade = make_plan(model, PlanConfig(strata="layer", error=0.01, confidence=0.99))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "campaign.sqlite"
        t0 = time.perf_counter()
        store = open_campaign(args.run, cfg, factory, fresh=True, model=model, path=path)
        engine = factory()  # golden cache (the workers build their own)
        ensure_golden(store, engine)
        setup = time.perf_counter() - t0
        planned = store.counts()["planned"]
        subset = None
        if args.limit is not None:  # whole engine chunks spread evenly over the plan
            chunks = chunks_of(store.pending(), 32)
            want = min(len(chunks), max(1, -(-args.limit // 32)))
            picks = sorted({round(i * (len(chunks) - 1) / max(want - 1, 1)) for i in range(want)})
            subset = [pf for i in picks for pf in chunks[i]][: args.limit]
        res = run_campaign(store, factory, engine=engine if args.workers == 1 else None,
                           workers=args.workers, faults=subset)
        rate = res["ran"] / res["seconds"] if res["seconds"] > 0 else float("nan")
        by_layer = cfr_table(store, by=("layer",), criterion=args.criterion)
        by_bit = cfr_table(store, by=("bit",), criterion=args.criterion)
        store.close()
    summary = {
        "run": args.run,
        "plan": "layer-wise, e=0.05, confidence=0.95, p=0.5",
        "population": seed_grade.population,
        "planned_faults": planned,
        "ran_faults": res["ran"],
        "workers": args.workers,
        "setup_s": round(setup, 3),
        "wall_s": round(res["seconds"], 3),
        "faults_per_s": round(rate, 3),
        "projected_full_plan_s": round(planned / rate, 1) if rate == rate else None,
        "seed_grade_faults": seed_grade.total,
        "seed_grade_projected_s": round(seed_grade.total / rate, 1) if rate == rate else None,
        "cfr_by_layer": [{k: r[k] for k in ("layer", "n", "cfr", "ci", "margin")}
                         for r in by_layer],
        "cfr_by_bit": [{k: r[k] for k in ("bit", "n", "cfr", "ci", "margin")} for r in by_bit],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return summary
    print(f"run {args.run}: population {seed_grade.population:,} weight bits")
    print(f"layer-wise e=5 %, 95 %: {planned:,} faults planned, ran {res['ran']:,} in "
          f"{res['seconds']:.1f} s with {args.workers} worker(s) = {rate:.1f} faults/s")
    print(f"projected full plan: {summary['projected_full_plan_s']} s; seed-grade plan "
          f"(layer-wise, e=1 %, 99 %): {seed_grade.total:,} faults = "
          f"{summary['seed_grade_projected_s']} s at this rate")
    print(f"\nCFR under {args.criterion} per layer:")
    for r in summary["cfr_by_layer"]:
        print(f"  {r['layer']:<14} n={r['n']:>6}  CFR={100 * r['cfr']:7.3f} %  "
              f"CI=[{100 * r['ci'][0]:.3f}, {100 * r['ci'][1]:.3f}] %")
    print("CFR per bit:")
    for r in summary["cfr_by_bit"]:
        print(f"  bit {r['bit']:>2}  n={r['n']:>6}  CFR={100 * r['cfr']:7.3f} %")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
