"""Fixed vs calibrated class priors for a completed stratified campaign's design (BENCHMARKS §12).

    OMP_NUM_THREADS=1 python benchmarks/calibrated_priors.py RUN [--reps 20] [--error E]
        [--confidence C] [--json] [--save F]

RUN holds a completed stratified campaign (``--exclude-certified`` or not). Per layer, its
uncertified sub-strata become a synthetic finite population with the sub-strata's sizes and,
as true rates, the rates the campaign observed in them (all rounds pooled); certified faults
are known and leave the layer's margin to the uncertified part (``e N / N_uncertified``).
The campaign's own sequential design (:func:`flipguard.criticality.run_stratified`, audit,
allocation, top-ups and a closing round, at most 4 rounds after the audit, as
``campaign run --sampling stratified``) is then replayed ``--reps`` times per layer with the
plan's fixed priors and with the priors ``--class-priors calibrated`` takes from RUN's
calibration (:meth:`flipguard.study.calibration.Calibration.priors`, grouped as the plan
groups them). Reported: mean simulated faults per layer and in all,
the ratio to Leveugle's plan, how often the interval covered the synthetic truth and how
often the margin was met (``--error`` / ``--confidence``: replay at another margin than the
campaign's). A projection (synthetic outcomes at the observed rates), not a
campaign: the real campaign's total for the fixed priors checks the replay.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np
from _emit import command, emit

from flipguard.campaign.analysis import classify_store
from flipguard.campaign.planner import PlanConfig, make_plan
from flipguard.campaign.store import CampaignStore, store_path
from flipguard.campaign.substrata import CERTIFIED, run_stratified, split_key
from flipguard.inject import CRITICAL
from flipguard.study.calibration import calibration_key, load_calibration
from flipguard.study.campaigns import plan_campaign
from flipguard.study.engines import RunEngineFactory

MAX_ROUNDS = 4  # refine_stratified: the allocation round plus at most 3 more


def layer_cells(run: str) -> tuple[Any, dict[str, dict[int, dict[str, float]]], int,
                                   dict[str, Any]]:
    """The campaign's config, per layer and sub-stratum ``{N, n, k, p}`` (certified: ``N``
    only), the faults it simulated and its engine recipe."""
    with CampaignStore(store_path(run)) as store:
        cfg = PlanConfig.from_dict(store.definition["plan"])
        eng = store.definition.get("engine", {})
        cells: dict[str, dict[int, dict[str, float]]] = {}
        for s in store.strata():
            parent, h = split_key(s.key)
            cells.setdefault(str(parent), {})[int(h)] = {"N": s.N, "n": 0, "k": 0, "p": s.p}
        for pf, cls in classify_store(store, cfg.criterion):
            parent, h = split_key(pf.stratum)
            c = cells[str(parent)][int(h)]
            c["n"] += 1
            c["k"] += cls in CRITICAL
        done = store.counts()["done"]
    return cfg, cells, done, eng


def calibrated_group_priors(run: str, cfg: Any, eng: dict[str, Any]
                            ) -> dict[str, dict[int, float]]:
    """Per layer and sub-stratum: the prior the campaign's plan gets with RUN's calibrated
    class priors (``stratify_plan``: a group's the size-weighted mean of its classes'), on
    the images the campaign evaluated."""
    factory = RunEngineFactory(run, images=eng.get("images"), fmt=cfg.fmt,
                               data_dir=eng.get("data_dir"))
    calib = load_calibration(run, calibration_key(factory, cfg))
    if calib is None:
        raise SystemExit(f"{run}: no calibration recorded for this campaign's predictor")
    plan = plan_campaign(run, replace(cfg, class_priors=calib.priors()), eng.get("images"),
                         probe=0).plan
    out: dict[str, dict[int, float]] = {}
    for s in plan["strata"]:
        out.setdefault(s["parent"], {})[int(s["crit"])] = s["p"]
    return out


def replay(cells: dict[int, dict[str, float]], priors: dict[int, float], error: float,
           confidence: float, reps: int, seed: int = 0) -> dict[str, float]:
    """The sequential design on the layer's synthetic population, ``reps`` seeded times."""
    live = sorted(h for h in cells if h != CERTIFIED)
    N_all = sum(c["N"] for c in cells.values())
    sizes = [int(cells[h]["N"]) for h in live]
    rng = np.random.default_rng(seed)
    cls = np.repeat(np.arange(len(live)), sizes)
    truth = np.concatenate([rng.permutation(np.arange(n) < round(n * cells[h]["k"] /
                                                                 max(cells[h]["n"], 1)))
                            for n, h in zip(sizes, live, strict=True)])
    e = error * N_all / sum(sizes)
    exact = truth.mean()
    pri = [priors[h] for h in live]
    tot = hit = met = 0.0
    for r in range(reps):
        res = run_stratified(cls, lambda j: truth[j], error=e, confidence=confidence,
                             seed=r, key="layer", priors=pri, sequential=True,
                             max_rounds=MAX_ROUNDS)
        tot += res.total
        hit += res.estimate.ci[0] <= exact <= res.estimate.ci[1]
        met += res.estimate.margin <= e
    return {"faults": tot / reps, "coverage": hit / reps, "margin_met": met / reps}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--error", type=float, default=None)
    ap.add_argument("--confidence", type=float, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    cfg, cells, done, eng = layer_cells(a.run)
    if cfg.class_priors is not None:
        raise SystemExit(f"{a.run}: the campaign planned with calibrated priors; the replay "
                         f"compares the fixed ones against the calibration")
    cal = calibrated_group_priors(a.run, cfg, eng)
    cfg = replace(cfg, error=a.error or cfg.error, confidence=a.confidence or cfg.confidence)
    leveugle = make_plan(RunEngineFactory(a.run).model(),
                         replace(cfg, sampling="uniform", class_groups=None, class_priors=None,
                                 exclude_certified=False)).total
    rows = []
    for layer, c in cells.items():
        fixed = {h: v["p"] for h, v in c.items()}
        row: dict[str, Any] = {"layer": layer, "campaign": sum(v["n"] for v in c.values())}
        for name, pri in (("fixed", fixed), ("calibrated", cal[layer])):
            row[name] = replay(c, pri, cfg.error, cfg.confidence, a.reps)
            row[f"{name}_priors"] = {h: pri[h] for h in sorted(pri)}
        rows.append(row)
    names = ("fixed", "calibrated")
    total = {n: sum(r[n]["faults"] for r in rows) for n in names}
    pooled = {n: {k: float(np.mean([r[n][k] for r in rows])) for k in ("coverage", "margin_met")}
              for n in names}
    summary = {"command": command("calibrated_priors.py", argv, "OMP_NUM_THREADS=1 "),
               "run": a.run, "reps": a.reps, "error": cfg.error, "confidence": cfg.confidence,
               "class_groups": cfg.class_groups, "campaign_faults": done,
               "leveugle": leveugle, "total": total,
               "ratio": {n: leveugle / v for n, v in total.items()}, "pooled": pooled,
               "layers": rows}

    def text() -> str:
        out = ["| layer | campaign | fixed priors: faults (cover, margin met) | "
               "calibrated: faults (cover, margin met) |", "|---|---:|---|---|"]
        for r in rows:
            f, c = r["fixed"], r["calibrated"]
            out.append(f"| {r['layer']} | {r['campaign']:,} | {f['faults']:,.0f} "
                       f"({f['coverage']:.2f}, {f['margin_met']:.2f}) | {c['faults']:,.0f} "
                       f"({c['coverage']:.2f}, {c['margin_met']:.2f}) |")
        f, c = pooled["fixed"], pooled["calibrated"]
        out.append(f"| **all** | **{done:,}** | **{total['fixed']:,.0f}** "
                   f"({leveugle / total['fixed']:.1f}x; {f['coverage']:.3f}, "
                   f"{f['margin_met']:.3f}) | **{total['calibrated']:,.0f}** "
                   f"({leveugle / total['calibrated']:.1f}x; {c['coverage']:.3f}, "
                   f"{c['margin_met']:.3f}) |")
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
