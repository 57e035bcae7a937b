"""Resiliency Accuracy on a run directory: RA per exposure model, MC vs adaptive IS.

1. For each hardware model (uniform, memory, systolic): the time to build ``P``, its
   weight/activation shares, the modelled cycles, and RA estimated by importance sampling
   with ``--is-samples`` samples (default proposal ``adaptive``: criticality-predictor start,
   cell masses re-fitted after every batch, no pilot; the predictor is built once and shared).
2. Under ``--hardware`` (default systolic) plain Monte Carlo with ``--mc-samples`` samples.
3. Per-injection variance of each estimator and the injections each needs for every margin
   in ``--margins`` at ``--confidence``, for a *valid* interval (the betting confidence
   sequence of ``estimate_ra``: ``samples_needed`` from the variance, the mean and the term
   bound -- 1 for MC, the proposal's last weight bound for IS) and, for comparison, for the
   old normal interval ``(z * sd / m)^2``; at least ``--min-samples``. IS's sd is its pooled
   per-sample sd over the whole run, learning batches included (conservative beyond the
   run). The MC sd is measured twice: from the MC samples (few non-zero drops: noisy) and
   from the IS samples (``E_P[d^2] - D^2`` with ``E_P[d^2] = mean(w d^2)``, unbiased).
   Injections count distinct sites (a site drawn twice is injected once). Intervals at the
   fixed sample counts are the confidence sequence's (valid at any fixed n).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_ra.py runs/magnetic_tile \\
        --images 64 --is-samples 256 --mc-samples 512
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _emit import command, emit
from scipy.stats import norm

from flipguard.ra.confseq import samples_needed

MODELS = ("uniform", "memory", "systolic")


def _terms(store, stream: str, golden: float) -> tuple[np.ndarray, np.ndarray]:
    _, q, p, acc = store.samples(stream)
    return p / q, golden - acc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory")
    ap.add_argument("--hardware", default="systolic", help="model for the MC/IS comparison")
    ap.add_argument("--is-samples", type=int, default=256, help="IS samples per model")
    ap.add_argument("--mc-samples", type=int, default=512, help="MC samples")
    ap.add_argument("--images", type=int, default=None, help="test images (default all)")
    ap.add_argument("--proposal", default="adaptive", help="IS proposal")
    ap.add_argument("--alpha", type=float, default=0.2, help="defensive share of P in q")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--margins", default="0.0025,0.0005,0.0002",
                    help="half-widths to plan for")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--min-samples", type=int, default=100)
    ap.add_argument("--targets", default="weight,activation")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    ap.add_argument("--save", default=None, help="also write the summary JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from flipguard.ra import (
        AdaptiveProposal,
        CachedEvaluator,
        EngineEvaluator,
        ProposalContext,
        RAStore,
        build_exposure,
        defensive,
        estimate_ra,
        make_proposal,
    )
    from flipguard.ra.proposal import CriticalityProposal
    from flipguard.study.resiliency import engine_for_run

    targets = tuple(t for t in args.targets.split(",") if t)
    z = float(norm.ppf(0.5 + args.confidence / 2))
    t0 = time.perf_counter()
    engine, fps, _ = engine_for_run(Path(args.run), args.images, "fp32", None)
    golden = float(engine.golden.accuracy)
    out: dict = {"run": args.run, "images": engine.n, "golden_s": time.perf_counter() - t0,
                 "golden_accuracy": golden, "alpha": args.alpha, "proposal": args.proposal,
                 "confidence": args.confidence, "models": {}}
    dists = {}
    for hw in MODELS:
        t = time.perf_counter()
        dists[hw] = build_exposure(engine.model, engine.inputs[:1], hw, targets)
        out["models"][hw] = {"build_s": time.perf_counter() - t, "cycles":
                             dists[hw].info.get("cycles"), "share": dists[hw].shares()}
    prop = make_proposal(args.proposal)
    if isinstance(prop, AdaptiveProposal) and isinstance(prop.start, CriticalityProposal):
        from flipguard.criticality import Predictor

        t = time.perf_counter()
        pred = Predictor.build(engine.model, engine.inputs, engine.task,
                               prop.start.criterion, targets=targets, fmt="fp32",
                               max_images=prop.start.max_images)
        prop = AdaptiveProposal(prop.kappa, CriticalityProposal(pred), prop.keep_shape)
        out["predictor_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        store = RAStore(Path(tmp) / "ra.sqlite", fps)
        base = EngineEvaluator(engine)

        def run(hw: str, estimator: str, n: int) -> dict:
            p = dists[hw]
            evaluate = CachedEvaluator(base, store)
            stream = f"{hw}-{estimator}"
            store.open_stream(stream, {"hardware": hw, "estimator": estimator})
            t = time.perf_counter()
            q = None
            if estimator == "is":
                ctx = ProposalContext(engine.model, engine.inputs, engine.task.labels,
                                      engine.task.kind, evaluate, golden, "fp32", 0)
                mixture = getattr(prop, "mixture", None)
                q = (mixture(p, ctx, args.alpha) if callable(mixture)
                     else defensive(p, prop.heuristic(p, ctx), args.alpha))
            setup = time.perf_counter() - t
            pilot = evaluate.injected
            est = estimate_ra(p, evaluate, golden, q=q, target_margin=0.0,
                              confidence=args.confidence, max_samples=n, min_samples=2,
                              batch=args.batch, seed=0,
                              weight_bound=None if q is None else 1 / args.alpha,
                              record=store.recorder(stream))
            w, d = _terms(store, stream, golden)
            res = {"ra": est.ra, "ci": list(est.ci), "half_width": est.half_width,
                   "drop": est.accuracy_drop, "samples": est.samples, "ess": est.ess,
                   "injections": evaluate.injected, "pilot": pilot,
                   "nonzero_drops": int((d != 0).sum()), "sd": float((w * d).std(ddof=1)),
                   "setup_s": setup, "seconds": time.perf_counter() - t,
                   "interval": est.interval, "bound": 1.0}
            if q is not None:  # MC's per-sample sd under P, from the IS samples
                wb = getattr(q, "weight_bound", None)
                res["bound"] = float(wb()) if callable(wb) else 1 / args.alpha
                res["sd_mc_from_is"] = math.sqrt(max(float(np.mean(w * d ** 2))
                                                     - est.accuracy_drop ** 2, 0.0))
                summary = getattr(q, "summary", None)
                if callable(summary):
                    res["adaptive"] = summary(3)
            return res

        for hw in MODELS:
            out["models"][hw]["is"] = run(hw, "is", args.is_samples)
        out["mc"] = run(args.hardware, "mc", args.mc_samples)
        store.close()
    r_is = out["models"][args.hardware]["is"]
    sds = {"mc (MC samples)": out["mc"]["sd"], "mc (IS samples)": r_is["sd_mc_from_is"],
           "is": r_is["sd"]}
    bounds = {"mc (MC samples)": 1.0, "mc (IS samples)": 1.0, "is": r_is["bound"]}
    drop = r_is["drop"]
    out["needed"], out["needed_clt"] = {}, {}
    for m in (float(s) for s in args.margins.split(",") if s):
        clt = {k: max(args.min_samples, math.ceil((z * v / m) ** 2)) for k, v in sds.items()}
        row = {k: max(args.min_samples, samples_needed(
            m, v ** 2, drop, bounds[k] * (golden - 1), bounds[k] * golden, args.confidence))
            for k, v in sds.items()}
        row["ratio"] = row["mc (IS samples)"] / row["is"]
        clt["ratio"] = clt["mc (IS samples)"] / clt["is"]
        out["needed"][m], out["needed_clt"][m] = row, clt
    out["sd"] = sds
    return emit(out, args.save, args.json, lambda: report(out, args, argv))


def report(out: dict, args, argv) -> str:
    pct = f"{100 * args.confidence:.0f} %"
    lines = [f"golden accuracy {out['golden_accuracy']:.4f} on {out['images']} images; "
             f"golden run {out['golden_s']:.0f} s"
             + (f"; criticality predictor {out['predictor_s']:.0f} s" if "predictor_s" in out
                else ""), "",
             f"| exposure model | P(weight) | P(activation) | cycles | RA ({pct} CS) | "
             "accuracy drop | samples / injections | MC-equivalent ESS |",
             "|---|---|---|---|---|---|---|---|"]
    for hw, m in out["models"].items():
        r = m["is"]
        cyc = f"{m['cycles']:,.0f}" if m["cycles"] else "—"
        lines.append(f"| {hw} | {m['share'].get('weight', 0):.3f} | "
                     f"{m['share'].get('activation', 0):.3f} | {cyc} | {r['ra']:.4f} ± "
                     f"{r['half_width']:.4f} | {r['drop']:+.4f} | {r['samples']} / "
                     f"{r['injections']} | {r['ess']:.0f} |")
    mc = out["mc"]
    lines += ["", f"MC ({args.hardware}): RA {mc['ra']:.4f} ± {mc['half_width']:.4f}, "
              f"{mc['samples']} samples, {mc['injections']} injections, {mc['nonzero_drops']} "
              f"non-zero drops, {mc['seconds']:.0f} s",
              f"IS ({args.hardware}): {out['models'][args.hardware]['is']['nonzero_drops']} "
              f"non-zero drops in {out['models'][args.hardware]['is']['samples']} samples", "",
              "per-injection sd: " + ", ".join(f"{k} {v:.5f}" for k, v in out["sd"].items()),
              f"IS term bound (last batch): {r_is_bound(out, args):.3f}", "",
              "Injections for a valid interval (betting CS; old normal interval in brackets):",
              "", "| margin | MC (sd from MC samples) | MC (sd from IS samples) | IS | "
              "MC / IS |", "|---|---|---|---|---|"]
    for m, row in out["needed"].items():
        c = out["needed_clt"][m]
        lines.append(f"| ±{100 * m:.3g} % | {row['mc (MC samples)']} "
                     f"({c['mc (MC samples)']}) | {row['mc (IS samples)']} "
                     f"({c['mc (IS samples)']}) | {row['is']} ({c['is']}) | "
                     f"{row['ratio']:.1f}× ({c['ratio']:.1f}×) |")
    return "\n".join(lines + ["", f"command: {command('bench_ra.py', argv or None)}"])


def r_is_bound(out: dict, args) -> float:
    return float(out["models"][args.hardware]["is"]["bound"])


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
