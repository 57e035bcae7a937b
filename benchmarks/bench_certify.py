"""Certified campaign vs the same campaign simulated in full (BENCHMARKS §12).

    flipguard campaign run RUN_A --strata layer --error 0.1 --confidence 0.95 --seed 0 \\
        --workers 2                       # reference: every image of every fault simulated
    flipguard campaign run RUN_B ... --certify     # the same plan and seed, certified
    python benchmarks/bench_certify.py RUN_A RUN_B [--json out.json]

Both stores must hold the same fault list (same plan and seed). Reports per layer and per
bit: faults, the share of (fault, image) pairs certified (not simulated), faults certified
on every image, and whether every fault's decisions (flips, accuracy, F1, non-finite) are
identical; then the compute seconds of both stores and the certificates' set-up time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from flipguard.campaign.store import CampaignStore
from flipguard.inject import Outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("certified")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    with CampaignStore(Path(a.reference) / "campaign.sqlite") as s1, \
            CampaignStore(Path(a.certified) / "campaign.sqlite") as s2:
        ref = {pf.fault_id: (pf, Outcome.from_dict(r)) for pf, r in s1.results()}
        cer = {pf.fault_id: (pf, Outcome.from_dict(r)) for pf, r in s2.results()}
        secs = {"reference": s1.compute_seconds(), "certified": s2.compute_seconds()}
    common = sorted(set(ref) & set(cer))
    n_images = max(o.n_images + o.n_certified for _, o in cer.values())
    rows: dict[str, dict] = {"layer": defaultdict(lambda: [0, 0.0, 0, 0]),
                             "bit": defaultdict(lambda: [0, 0.0, 0, 0])}
    mismatched = []
    for fid in common:
        (pf, o_ref), (pf2, o) = ref[fid], cer[fid]
        assert pf.fault == pf2.fault, f"fault {fid} differs: not the same plan and seed"
        same = o.same_decisions(o_ref)
        if not same:
            mismatched.append(fid)
        share = o.n_certified / n_images
        for key, g in (("layer", pf.fault.layer), ("bit", pf.fault.bits[-1])):
            v = rows[key][g]
            v[0] += 1
            v[1] += share
            v[2] += o.certified
            v[3] += same
    out = {"faults": len(common), "images": n_images, "mismatched": mismatched,
           "pairs_certified": float(np.mean([cer[f][1].n_certified / n_images
                                             for f in common])),
           "fully_certified": int(sum(cer[f][1].certified for f in common)),
           "compute_seconds": {k: v[0] for k, v in secs.items()},
           "by": {k: {str(g): {"faults": v[0], "pairs_certified": v[1] / v[0],
                               "fully_certified": v[2], "same_decisions": v[3]}
                      for g, v in sorted(d.items(), key=lambda kv: str(kv[0]))}
                  for k, d in rows.items()}}
    certs = sorted((Path(a.certified) / "certificates").glob("*.npz"))
    if certs:
        with np.load(certs[-1]) as d:
            meta = json.loads(bytes(d["__meta__"]).decode())
        out["certificate_seconds"] = sum(v["seconds"] for v in meta.values())
        out["certificates"] = meta
    print(json.dumps({k: v for k, v in out.items() if k not in ("by", "certificates")},
                     indent=1))
    for key in ("layer", "bit"):
        print(f"\n| {key} | faults | (fault, image) pairs certified | faults certified on every "
              f"image | identical decisions |")
        print("|---|---:|---:|---:|---:|")
        for g, v in out["by"][key].items():
            print(f"| {g} | {v['faults']} | {100 * v['pairs_certified']:.1f} % | "
                  f"{v['fully_certified']} | {v['same_decisions']} / {v['faults']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
