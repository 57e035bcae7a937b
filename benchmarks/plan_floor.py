"""The fewest faults any stratified plan can simulate at a margin (BENCHMARKS §12).

    python benchmarks/plan_floor.py [RUN] [--error 0.01] [--confidence 0.99] [--critical 0.1]
        [--shares runs/share_mt.json] [--json] [--save F]

A *perfect* predictor puts every fault of a layer into a class that is exactly 0 % or exactly
100 % critical (``--critical``: the share of the critical class). Even then each class must
bound its own unseen rate (with 0 critical of n the exact upper bound is ≈ 5.3 / n at 99 %),
so the planner (:func:`flipguard.campaign.substrata.allocate`, the allocation every
stratified campaign uses) still draws faults; only certified faults, counted exactly, shrink
it. Per layer of RUN's model (default: ``build_cae()``): Leveugle's plan, the
perfect-predictor floor without certification and with the certified share of ``--shares``
(the JSON written by ``bench_certified_share.py --save``), and the ratios to Leveugle.
"""

from __future__ import annotations

import argparse
import json

from _emit import emit

from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.substrata import allocate
from flipguard.models.cae import build_cae
from flipguard.study.engines import RunEngineFactory


def floor(N: int, certified: int, critical: float, error: float, confidence: float,
          audit: int = 30) -> int:
    """Faults a perfect predictor's plan draws from a layer of ``N`` faults, ``certified`` of
    them counted exactly and the rest split ``1 - critical`` : ``critical`` into a 0 % and a
    100 % class."""
    rest = N - certified
    if rest <= 0:
        return 0
    hot = max(1, round(critical * rest))
    sizes, rates, have = [rest - hot, hot], [0.0, 1.0], [0, 0]
    if certified:
        sizes, rates, have = [certified, *sizes], [0.0, *rates], [certified, *have]
    n = allocate(sizes, rates, error, confidence, audit=audit, have=have)
    return int(n.sum()) - (certified if certified else 0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=None, help="run directory (its model)")
    ap.add_argument("--error", type=float, default=0.01)
    ap.add_argument("--confidence", type=float, default=0.99)
    ap.add_argument("--critical", type=float, default=0.1)
    ap.add_argument("--shares", default=None, help="bench_certified_share.py --save output")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    model = RunEngineFactory(a.run).model() if a.run else build_cae()
    plan = make_plan(model, PlanConfig(strata="layer", error=a.error,
                                             confidence=a.confidence))
    share: dict[str, float] = {}
    if a.shares:
        with open(a.shares, encoding="utf-8") as f:
            share = {r["layer"]: float(r["criterion"]) for r in json.load(f)["layers"]}
    rows = []
    for s in plan.strata:
        cert = int(share.get(s.layer, 0.0) * s.N)
        rows.append({"layer": s.layer, "N": s.N, "leveugle": s.n,
                     "floor": floor(s.N, 0, a.critical, a.error, a.confidence),
                     "certified": cert,
                     "floor_certified": floor(s.N, cert, a.critical, a.error, a.confidence)})
    tot = {k: sum(r[k] for r in rows) for k in ("N", "leveugle", "floor", "floor_certified")}
    summary = {"run": a.run, "error": a.error, "confidence": a.confidence, "critical": a.critical,
               "shares": a.shares, "layers": rows, "total": tot,
               "ratio": tot["leveugle"] / tot["floor"],
               "ratio_certified": tot["leveugle"] / tot["floor_certified"]}

    def text() -> str:
        out = [f"{'layer':12s} {'N':>10s} {'Leveugle':>9s} {'floor':>6s} {'certified':>10s} "
               f"{'floor':>6s}"]
        out += [f"{r['layer']:12s} {r['N']:10,d} {r['leveugle']:9,d} {r['floor']:6,d} "
                f"{r['certified']:10,d} {r['floor_certified']:6,d}" for r in rows]
        out.append(f"{'total':12s} {tot['N']:10,d} {tot['leveugle']:9,d} {tot['floor']:6,d} "
                   f"{'':10s} {tot['floor_certified']:6,d}")
        out.append(f"Leveugle / floor: {summary['ratio']:.1f}x without certification, "
                   f"{summary['ratio_certified']:.1f}x with it")
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
