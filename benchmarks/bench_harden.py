"""Selective hardening vs memory budget, proven by paired re-injection of a campaign's faults.

For each criterion and each scheme set, ``flipguard harden`` is run (without saving) at every
budget: the planner picks protections from the campaign's per-layer/bit/kernel CFR, then the
campaign's own faults are re-delivered through the protected read path and re-simulated
where the delivered word is neither corrected nor unchanged. Next to it, full ECC (SEC-DED on
every weight word) and full TMR (every bit of every weight word) on the same faults, and the
reference of Ruospo et al. (+43 % at 3 %). Prints a markdown table and the command.

Out of sample: ``--holdout A,B,...`` re-injects every plan, unchanged, on the campaigns of
other run directories of the same model and images (a fresh sample = a copy of the run
directory with a new campaign of another seed); each gets its own column and, when they
share the strata, the pooled hold-outs one more. ``--hardware systolic`` adds the
improvement over the systolic exposure (faults in PE registers are not removed).

    PYTHONPATH=src python benchmarks/bench_harden.py runs/magnetic_tile \\
        --criteria accuracy-drop:0.01,any-flip --holdout runs/mt_e5,runs/mt_fresh
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _emit import command

SCHEME_SETS = {"all": "tmr,parity,ecc,range,invariant", "paid": "tmr,parity,ecc"}


class _Memo:
    """The campaign engine, built once, with outcomes memoised per delivered fault (the
    same corrupted word is re-simulated once across budgets, sets and criteria)."""

    def __init__(self, run: str) -> None:
        from flipguard.campaign import CampaignStore, store_path
        from flipguard.study.hardening import campaign_engines
        from flipguard.study.stores import campaign_factory

        with CampaignStore(store_path(run)) as store:
            factory = campaign_factory(run, store)
        self.engine = campaign_engines(factory)(factory.parts().run.model)
        self.golden, self.memo, self.simulated = self.engine.golden, {}, 0

    def run(self, faults: list) -> list:
        todo = [f for f in dict.fromkeys(faults) if f not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.engine.run(todo), strict=True))
            self.simulated += len(todo)
        return [self.memo[f] for f in faults]

    def __call__(self, model: object) -> _Memo:
        return self


def _pc(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _held(h: dict | None) -> str:
    if h is None:
        return "-"
    b, imp, ci = h["cfr_before"], h["relative_improvement"], h["ci"]
    if imp is None or imp != imp:  # nothing critical in the held-out faults
        return f"n/a ({b['critical']} critical of {h['n_faults']})"
    return (f"{_pc(imp)} [{_pc(ci[0])}, {_pc(ci[1])}] ({b['critical']} critical of "
            f"{h['n_faults']}, p = {h['p_value']:.2g})")


def _baselines(run: str, criterion: str, boot: int, engines: _Memo) -> list[dict]:
    from flipguard.campaign import CampaignStore, store_path
    from flipguard.harden import Protection, paired_reinjection
    from flipguard.harden.planner import tensor_words, weight_bits
    from flipguard.study.rundir import load_run

    r = load_run(run)
    out = []
    with CampaignStore(store_path(r.path)) as store:
        fmt = store.definition.get("plan", {}).get("fmt", "fp32")
        layers = sorted({s.layer for s in store.strata() if s.target == "weight"})
        total = weight_bits(r.model, fmt)
        for name, make in (("full ECC (SEC-DED)", lambda ly: Protection("ecc", ly)),
                           ("full TMR (32 bits)", lambda ly: Protection("tmr", ly,
                                                                        bits=range(32)))):
            prots = [make(ly) for ly in layers]
            cost = sum(p.cost_bits(tensor_words(r.model, p.layer, p.target, fmt)[0].numel())
                       for p in prots)
            t0 = time.perf_counter()
            res = paired_reinjection(store, r.model, prots, criterion, engines, n_boot=boot)
            out.append({"name": name, "overhead": cost / total,
                        "seconds": time.perf_counter() - t0, **res.to_dict()})
    return out


def _holdouts(runs: list[str], protections: list[dict], criterion: str, draws: int,
              engines: _Memo, hardware: str | None) -> dict:
    """The chosen protections, unchanged, re-injected on the independent campaign of each
    run in ``runs`` (same model and images): the out-of-sample check of the plan; ``pooled``
    combines the hold-outs' paired faults stratum by stratum (independent samples of the
    same strata)."""
    from flipguard.campaign import CampaignStore, store_path
    from flipguard.harden import Protection, compare_paired, pair_cells, paired_reinjection
    from flipguard.study.hardening import evaluate_protections
    from flipguard.study.rundir import load_run

    prots = [Protection.from_dict({k: v for k, v in p.items() if k != "label"})
             for p in protections]
    out, pool, strata_N = {}, ([], [], []), None
    for run in runs:
        out[run] = evaluate_protections(run, prots, criterion, engines, hardware, draws)
        r = load_run(run)
        with CampaignStore(store_path(r.path)) as store:
            res = paired_reinjection(store, r.model, prots, criterion, engines, n_boot=100)
            N = {s.key: int(s.N) for s in store.strata()}
        strata_N = N if strata_N is None else (strata_N if strata_N == N else {})
        pool[0].extend(res.before.tolist())
        pool[1].extend(res.after.tolist())
        pool[2].extend(res.strata)
    pooled = None
    if len(runs) > 1 and strata_N:
        import numpy as np

        cmp = compare_paired(pair_cells(np.array(pool[0]), np.array(pool[1]), pool[2],
                                        strata_N), n_mc=draws)
        pooled = {**cmp.to_dict(), "n_faults": len(pool[0]),
                  "cfr_before": {"cfr": cmp.cfr_before, "critical": int(np.sum(pool[0]))}}
    return {"runs": out, "pooled": pooled}


def _plan_name(r: dict) -> str:
    return f"`{r['criterion']}`, {r['set']}, budget {_pc(r['budget'])} %"


def _print_tables(args: argparse.Namespace, rows: list[dict], base: dict,
                  holdouts: list[str]) -> None:
    pct = _pc
    for crit in args.criteria.split(","):
        first = next(r for r in rows if r["criterion"] == crit)
        b = first["cfr_before"]
        print(f"\n### {crit}: CFR before {100 * b['cfr']:.2f} % [{100 * b['ci'][0]:.2f}, "
              f"{100 * b['ci'][1]:.2f}] % ({first['n_faults']:,} faults, "
              f"{b.get('critical', '?')} critical)\n")
        print("| protections | budget % | overhead % | CFR after % [CI] | improvement % "
              "[95 % MOVER-R] | p (weighted) | p sign-flip | McNemar p (unweighted) | "
              "zero-critical strata % | re-simulated | protections chosen |")
        print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if r["criterion"] != crit:
                continue
            a, ci = r["cfr_after"], r["ci"]
            labels = sorted({p["scheme"] for p in r["protections"]})
            print(f"| {r['set']} | {pct(r['budget'])} | {pct(r['overhead'])} | "
                  f"{100 * a['cfr']:.2f} [{100 * a['ci'][0]:.2f}, {100 * a['ci'][1]:.2f}] | "
                  f"**{pct(r['relative_improvement'])}** [{pct(ci[0])}, {pct(ci[1])}] | "
                  f"{r['p_value']:.2g} | {r['p_sign_flip']:.2g} | {r['mcnemar_p']:.2g} | "
                  f"{pct(r['zero_critical_share'])} | {r['simulated']} | "
                  f"{len(r['protections'])} ({', '.join(labels) or '-'}) |")
        for x in base[crit]:
            a, ci = x["cfr_after"], x["ci"]
            print(f"| {x['name']} | - | {pct(x['overhead'])} | {100 * a['cfr']:.2f} "
                  f"[{100 * a['ci'][0]:.2f}, {100 * a['ci'][1]:.2f}] | "
                  f"{pct(x['relative_improvement'])} [{pct(ci[0])}, {pct(ci[1])}] | "
                  f"{x['p_value']:.2g} | {x['p_sign_flip']:.2g} | {x['mcnemar_p']:.2g} | "
                  f"{pct(x['zero_critical_share'])} | {x['simulated']} | all weight layers |")
        print("| reference (Ruospo et al.) | 3 | 3 | - | 43 | - | - | - | - | - | - |")
    if holdouts:
        pooled = len(holdouts) > 1
        print("\n### Out of sample: each plan re-injected unchanged on independent campaigns\n")
        print("| plan (fitted on " + args.run + ") | overhead % | in-sample improvement % | "
              + " | ".join(f"hold-out `{h}` % [95 % CI]" for h in holdouts)
              + (" | pooled hold-outs % [95 % CI]" if pooled else "") + " |")
        print("|---|---:|---:|" + "---|" * (len(holdouts) + pooled))
        for r in rows:
            held = r["holdout"]
            cells = [_held(held["runs"][h]) for h in holdouts]
            if pooled:
                cells.append(_held(held["pooled"]))
            print(f"| {_plan_name(r)} | {pct(r['overhead'])} | "
                  f"{pct(r['relative_improvement'])} | " + " | ".join(cells) + " |")
    if args.hardware:
        print(f"\n### Over the `{args.hardware}` exposure (faults outside the covered "
              f"locations are not removed)\n")
        print("| plan | in-memory improvement % | exposure-weighted, all faults in storage % "
              "| over the measured exposure % | covered share % | measured share % | whole "
              "exposure, unmeasured at the same CFR % |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            e = r.get("exposure") or {}
            w = e.get("whole_exposure") or {}
            print(f"| {_plan_name(r)} | {pct(r['relative_improvement'])} | "
                  f"{pct(e.get('relative_improvement_if_all_storage'))} | "
                  f"**{pct(e.get('relative_improvement'))}** | {pct(e.get('covered_share'))} "
                  f"| {pct(e.get('measured_share'))} | "
                  f"{pct(w.get('relative_improvement_if_same_cfr'))} |")
    cov = max(rows, key=lambda r: len(r.get("coverage") or []))["coverage"] if rows else []
    if cov:
        print("\n### What each protection covers and costs (largest plan)\n")
        print("| scheme | covers | not covered | effect | memory bits | protected words | "
              "read-path cost per load |")
        print("|---|---|---|---|---:|---:|---|")
        for c in cov:
            print(f"| {c['scheme']} | {', '.join(c['locations'])} | "
                  f"{', '.join(c['not_covered'])} | {c['effect']} | {c['memory_bits']:,} | "
                  f"{c['protected_words'] or '-'} | {c['per_load']} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory with a finished campaign")
    ap.add_argument("--budgets", default="0,0.01,0.03,0.05,0.1")
    ap.add_argument("--criteria", default="accuracy-drop:0.01,any-flip")
    ap.add_argument("--sets", default="all,paid", help="scheme sets: all | paid (no free "
                                                        "range/invariant protections)")
    ap.add_argument("--draws", "--boot", type=int, default=20_000, dest="boot",
                    help="Monte Carlo draws of the sign-flip test")
    ap.add_argument("--holdout", default=None, help="comma list of run directories of the "
                    "same model, each with an independent campaign: each plan is also "
                    "evaluated on their faults")
    ap.add_argument("--hardware", default=None, help="exposure model (e.g. systolic): also "
                    "the improvement over its whole exposure")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    ap.add_argument("--save", default=None, help="also write the summary JSON to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from flipguard.study.hardening import harden_run

    budgets = [float(b) for b in args.budgets.split(",")]
    holdouts = [h for h in (args.holdout or "").split(",") if h]
    rows, base = [], {}
    t_all = time.perf_counter()
    engines = _Memo(args.run)
    setup_s = time.perf_counter() - t_all
    for crit in args.criteria.split(","):
        for set_name in args.sets.split(","):
            for b in budgets:
                t0 = time.perf_counter()
                res = harden_run(args.run, budget=b, schemes=SCHEME_SETS[set_name],
                                 criterion=crit, curve=False, n_boot=args.boot, save=False,
                                 engine_for=engines, hardware=args.hardware).to_dict()
                print(f"{crit} {set_name} {b:g}: overhead {res['overhead']:.4f}, improvement "
                      f"{res['relative_improvement']}, {res['simulated']} re-delivered, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                held = (_holdouts(holdouts, res["protections"], crit, args.boot, engines,
                                  args.hardware) if holdouts else None)
                rows.append({"criterion": crit, "set": set_name, "budget": b, "holdout": held,
                             "seconds": time.perf_counter() - t0,
                             **{k: res[k] for k in ("overhead", "cfr_before", "cfr_after",
                                                    "relative_improvement", "ci", "p_value",
                                                    "p_sign_flip", "mcnemar_p",
                                                    "zero_critical_share", "n_faults",
                                                    "simulated", "protections", "coverage",
                                                    "exposure", "fault_free")}})
        base[crit] = _baselines(args.run, crit, args.boot, engines)
    summary = {"run": args.run, "rows": rows, "baselines": base, "setup_s": setup_s,
               "simulated_distinct": engines.simulated,
               "total_s": time.perf_counter() - t_all,
               "command": command("bench_harden.py", argv, prefix="PYTHONPATH=src ")}
    if args.save:
        from pathlib import Path

        Path(args.save).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return summary
    _print_tables(args, rows, base, holdouts)
    print(f"\n{engines.simulated:,} distinct corrupted words simulated in all; engine set-up "
          f"{setup_s:.0f} s, total {summary['total_s']:.0f} s.\n\n`{summary['command']}`")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
