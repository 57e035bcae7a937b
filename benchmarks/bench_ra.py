"""Resiliency Accuracy on a run directory: exposure models, MC vs IS cost and precision.

For each hardware model: the time to build ``P``, its weight/activation shares and the
modelled cycles; then, under ``--hardware`` (default systolic), Monte Carlo and importance
sampling with the same sample budget into a scratch store: RA, CI half-width, ESS, new
injections, wall time and the IS efficiency ``(half-width MC / half-width IS)^2`` (how many
times more MC samples the same precision would need). Finally the IS samples re-weighted to
every other model (no injection) next to their shares.

    PYTHONPATH=src python benchmarks/bench_ra.py runs/demo --samples 2000 --images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = ("uniform", "memory", "systolic")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory")
    ap.add_argument("--hardware", default="systolic", help="model for the MC/IS comparison")
    ap.add_argument("--samples", type=int, default=2000, help="samples per estimator")
    ap.add_argument("--images", type=int, default=None, help="test images (default all)")
    ap.add_argument("--proposal", default="pilot", help="IS proposal")
    ap.add_argument("--targets", default="weight,activation")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from flipguard.cli.ra import engine_for_run
    from flipguard.ra import RAConfig, RAStore, build_exposure, resiliency_accuracy, reweight

    targets = tuple(t for t in args.targets.split(",") if t)
    t0 = time.perf_counter()
    engine, fps, _ = engine_for_run(Path(args.run), args.images, "fp32", None)
    out: dict = {"run": args.run, "images": engine.n, "golden_s": time.perf_counter() - t0,
                 "golden_accuracy": engine.golden.accuracy, "models": {}}
    dists = {}
    for hw in MODELS:
        t = time.perf_counter()
        dists[hw] = build_exposure(engine.model, engine.inputs[:1], hw, targets)
        out["models"][hw] = {"build_s": time.perf_counter() - t, "cycles":
                             dists[hw].info.get("cycles"), "share": dists[hw].shares()}
    with tempfile.TemporaryDirectory() as tmp:
        store = RAStore(Path(tmp) / "ra.sqlite", fps)
        runs = {}
        for est in ("mc", "is"):
            cfg = RAConfig(hardware=args.hardware, estimator=est, proposal=args.proposal,
                           targets=targets, target_margin=0.0, max_samples=args.samples,
                           min_samples=2, batch=64)
            t = time.perf_counter()
            res = resiliency_accuracy(engine, cfg, store)
            res["seconds"] = time.perf_counter() - t
            runs[est] = res
        out["estimators"] = {k: {f: v[f] for f in ("ra", "ci", "half_width", "ess", "injections",
                                                   "samples", "seconds")}
                             for k, v in runs.items()}
        hw_mc, hw_is = runs["mc"]["half_width"], runs["is"]["half_width"]
        out["is_efficiency"] = (hw_mc / hw_is) ** 2 if hw_is > 0 else None
        sites, q, _, acc = store.samples(runs["is"]["stream"])
        out["reweighted"] = {hw: {"ra": (r := reweight(sites, q, acc, dists[hw],
                                                       engine.golden.accuracy)).ra,
                                  "half_width": r.half_width}
                             for hw in MODELS
                             if hw != args.hardware and dists[args.hardware].covers(dists[hw])}
        store.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"golden accuracy {out['golden_accuracy']:.4f} on {out['images']} images")
        for hw, m in out["models"].items():
            print(f"  {hw:9s} build {m['build_s']:.2f}s  cycles {m['cycles']}  {m['share']}")
        for k, v in out["estimators"].items():
            print(f"  {k}: RA {v['ra']:.4f} ± {v['half_width']:.4f}  ESS {v['ess']:.0f}  "
                  f"{v['injections']} injections in {v['seconds']:.1f}s")
        print(f"  IS efficiency {out['is_efficiency']}")
        for hw, v in out["reweighted"].items():
            print(f"  re-weighted to {hw}: RA {v['ra']:.4f} ± {v['half_width']:.4f}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
