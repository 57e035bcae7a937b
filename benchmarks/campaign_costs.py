"""Where a campaign's simulations and seconds went, per layer (BENCHMARKS §12).

    python benchmarks/campaign_costs.py RUN [--criterion C] [--json] [--save F]

Per layer: population, certified (counted, never simulated) faults, planned and executed
faults, the share of executed (fault, image) pairs certified, process-seconds per executed
fault, and the CFR with its interval; then the totals against Leveugle's plan of the same
margin for the same strata.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from _emit import emit

from flipguard.campaign.analysis import cfr_table
from flipguard.campaign.planner import PlanConfig
from flipguard.campaign.store import CampaignStore, store_path
from flipguard.campaign.substrata import CERTIFIED


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--criterion", default=None, help="default: the plan's criterion")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    with CampaignStore(store_path(a.run)) as store:
        cfg = PlanConfig.from_dict(store.definition["plan"])
        strata, rows = store.strata(), store.rows()
        meta = {"rounds": store.get_meta("rounds", 0), "closed": store.get_meta("closed", [])}
    crit = a.criterion or cfg.criterion
    per: dict[str, dict] = defaultdict(lambda: {"N": 0, "certified": 0, "planned": 0,
                                                "done": 0, "seconds": 0.0, "pairs": 0,
                                                "pairs_certified": 0})
    for s in strata:
        p = per[s.layer]
        p["N"] += s.N
        p["planned"] += s.n
        if s.crit == CERTIFIED:
            p["certified"] += s.N
    for r in rows:
        p = per[r["layer"]]
        p["done"] += 1
        p["seconds"] += float(r.get("seconds") or 0.0)
        n_c = int(r.get("n_certified") or 0)
        p["pairs"] += n_c + int(r.get("n_images") or 0)
        p["pairs_certified"] += n_c
    cfr = {row["layer"]: row for row in cfr_table(a.run, by="layer", criterion=crit)}
    leveugle = {s: cfg.sample_size(v["N"]) for s, v in per.items()}
    layers = []
    for name, p in per.items():
        c = cfr.get(name, {})
        layers.append({"layer": name, **p, "leveugle": leveugle[name],
                       "pairs_share": p["pairs_certified"] / p["pairs"] if p["pairs"] else 0.0,
                       "s_per_fault": p["seconds"] / p["done"] if p["done"] else None,
                       "cfr": c.get("cfr"), "ci": c.get("ci"), "margin": c.get("margin")})
    tot = {k: sum(v[k] for v in layers) for k in ("N", "certified", "planned", "done",
                                                  "seconds", "leveugle")}
    summary = {"run": a.run, "criterion": crit, **meta, "totals": tot,
               "fewer_than_leveugle": tot["leveugle"] / max(tot["planned"], 1),
               "layers": layers}

    def text() -> str:
        out = [f"{crit}; rounds {meta['rounds']}; planned {tot['planned']:,} (Leveugle "
               f"{tot['leveugle']:,}, {summary['fewer_than_leveugle']:.1f}x fewer), done "
               f"{tot['done']:,}, {tot['seconds']:.0f} process-s; certified "
               f"{tot['certified']:,} of {tot['N']:,}"]
        for r in layers:
            ci = r["ci"] or [float("nan")] * 2
            out.append(f"  {r['layer']:11s} planned {r['planned']:6,} done {r['done']:6,} "
                       f"cert {100 * r['certified'] / r['N']:5.1f} % pairs "
                       f"{100 * r['pairs_share']:5.1f} % s/fault "
                       f"{(r['s_per_fault'] or 0):5.2f} CFR {100 * (r['cfr'] or 0):6.3f} % "
                       f"[{100 * ci[0]:.3f}, {100 * ci[1]:.3f}]")
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
