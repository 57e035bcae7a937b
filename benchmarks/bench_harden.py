"""Selective hardening vs memory budget, proven by paired re-injection of a campaign's faults.

For each criterion and each scheme set, ``flipguard harden`` is run (without saving) at every
budget: the planner picks protections from the campaign's per-layer/bit/kernel CFR, then the
campaign's own faults are re-delivered through the protected read path and re-simulated
where the delivered word is neither corrected nor unchanged. Next to it, full ECC (SEC-DED on
every weight word) and full TMR (every bit of every weight word) on the same faults, and the
reference of Ruospo et al. (+43 % at 3 %). Prints a markdown table and the command.

    PYTHONPATH=src python benchmarks/bench_harden.py runs/magnetic_tile \\
        --criteria accuracy-drop:0.01,any-flip
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
        from flipguard.harden import campaign_engines
        from flipguard.run import load_run

        r = load_run(run)
        with CampaignStore(store_path(r.path)) as store:
            self.engine = campaign_engines(r, store)(r.model)
        self.golden, self.memo, self.simulated = self.engine.golden, {}, 0

    def run(self, faults: list) -> list:
        todo = [f for f in dict.fromkeys(faults) if f not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.engine.run(todo), strict=True))
            self.simulated += len(todo)
        return [self.memo[f] for f in faults]

    def __call__(self, model: object) -> _Memo:
        return self


def _held(h: dict | None) -> str:
    if h is None:
        return "-"
    b, imp, ci = h["cfr_before"], h["relative_improvement"], h["ci"]
    if imp is None or imp != imp:  # nothing critical in the held-out faults
        return f"n/a ({b['critical']} critical of {h['n_faults']})"
    return (f"{100 * imp:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] ({b['critical']} critical "
            f"of {h['n_faults']})")


def _baselines(run: str, criterion: str, boot: int, engines: _Memo) -> list[dict]:
    from flipguard.campaign import CampaignStore, store_path
    from flipguard.harden import Protection, paired_reinjection
    from flipguard.harden.planner import tensor_words, weight_bits
    from flipguard.run import load_run

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


def _holdout(run: str, protections: list[dict], criterion: str, boot: int,
             engines: _Memo) -> dict:
    """The chosen protections evaluated on the independent campaign of run ``run`` (same
    model and images): an out-of-sample check of the plan."""
    from flipguard.campaign import CampaignStore, store_path
    from flipguard.harden import Protection, paired_reinjection
    from flipguard.run import load_run

    r = load_run(run)
    prots = [Protection.from_dict({k: v for k, v in p.items() if k != "label"})
             for p in protections]
    with CampaignStore(store_path(r.path)) as store:
        return paired_reinjection(store, r.model, prots, criterion, engines,
                                  n_boot=boot).to_dict()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory with a finished campaign")
    ap.add_argument("--budgets", default="0,0.01,0.03,0.05,0.1")
    ap.add_argument("--criteria", default="accuracy-drop:0.01,any-flip")
    ap.add_argument("--sets", default="all,paid", help="scheme sets: all | paid (no free "
                                                        "range/invariant protections)")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--holdout", default=None, help="run directory of the same model with an "
                    "independent campaign: each plan is also evaluated on its faults")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from flipguard.harden import harden_run

    budgets = [float(b) for b in args.budgets.split(",")]
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
                                 engine_for=engines)
                print(f"{crit} {set_name} {b:g}: overhead {res['overhead']:.4f}, improvement "
                      f"{res['relative_improvement']}, {res['simulated']} re-delivered, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                held = (_holdout(args.holdout, res["protections"], crit, args.boot, engines)
                        if args.holdout else None)
                rows.append({"criterion": crit, "set": set_name, "budget": b, "holdout": held,
                             "seconds": time.perf_counter() - t0,
                             **{k: res[k] for k in ("overhead", "cfr_before", "cfr_after",
                                                    "relative_improvement", "ci", "mcnemar_p",
                                                    "n_faults", "simulated", "protections",
                                                    "fault_free")}})
        base[crit] = _baselines(args.run, crit, args.boot, engines)
    summary = {"run": args.run, "rows": rows, "baselines": base, "setup_s": setup_s,
               "simulated_distinct": engines.simulated,
               "total_s": time.perf_counter() - t_all,
               "command": command("bench_harden.py", argv, prefix="PYTHONPATH=src ")}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return summary
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for crit in args.criteria.split(","):
        first = next(r for r in rows if r["criterion"] == crit)
        b = first["cfr_before"]
        print(f"\n### {crit}: CFR before {100 * b['cfr']:.2f} % [{100 * b['ci'][0]:.2f}, "
              f"{100 * b['ci'][1]:.2f}] % ({first['n_faults']:,} faults, "
              f"{b.get('critical', '?')} critical)\n")
        print("| protections | budget % | overhead % | CFR after % [CI] | improvement % "
              "[95 % paired bootstrap] | McNemar p | re-simulated | protections chosen "
              "| held-out improvement % [CI] |")
        print("|---|---:|---:|---|---|---:|---:|---|---|")
        for r in rows:
            if r["criterion"] != crit:
                continue
            a, ci = r["cfr_after"], r["ci"]
            labels = sorted({p["scheme"] for p in r["protections"]})
            print(f"| {r['set']} | {pct(r['budget'])} | {pct(r['overhead'])} | "
                  f"{100 * a['cfr']:.2f} [{100 * a['ci'][0]:.2f}, {100 * a['ci'][1]:.2f}] | "
                  f"**{pct(r['relative_improvement'])}** [{pct(ci[0])}, {pct(ci[1])}] | "
                  f"{r['mcnemar_p']:.3g} | {r['simulated']} | {len(r['protections'])} "
                  f"({', '.join(labels) or '-'}) | {_held(r['holdout'])} |")
        for x in base[crit]:
            a, ci = x["cfr_after"], x["ci"]
            print(f"| {x['name']} | - | {pct(x['overhead'])} | {100 * a['cfr']:.2f} "
                  f"[{100 * a['ci'][0]:.2f}, {100 * a['ci'][1]:.2f}] | "
                  f"{pct(x['relative_improvement'])} [{pct(ci[0])}, {pct(ci[1])}] | "
                  f"{x['mcnemar_p']:.3g} | {x['simulated']} | all weight layers | - |")
        print("| reference (Ruospo et al.) | 3 | 3 | - | 43 | - | - | - | - |")
    print(f"\n{engines.simulated:,} distinct corrupted words simulated in all; engine set-up "
          f"{setup_s:.0f} s, total {summary['total_s']:.0f} s.\n\n`{summary['command']}`")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
