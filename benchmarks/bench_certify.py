"""Certified share of a finished campaign's faults, and a soundness check against its
simulated outcomes (BENCHMARKS §12).

    python benchmarks/bench_certify.py runs/mt_cfr [--images N] [--safety 2]

Builds the run's engine with a :class:`~flipguard.inject.certify.Certifier`, asks it about
every executed fault of ``RUN/campaign.sqlite`` (no simulation), and reports per layer and
per bit how many are certified, the certification time, and how many certified faults the
stored simulation says changed a decision (must be 0).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from flipguard.campaign.store import CampaignStore
from flipguard.inject import Outcome
from flipguard.inject.injector import faulty_value
from flipguard.study.engines import RunEngineFactory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--safety", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    factory = RunEngineFactory(a.run, images=a.images)
    t0 = time.perf_counter()
    eng = factory()
    eng.prepare()
    from flipguard.inject.certify import Certifier

    cert = Certifier(eng, safety=a.safety)
    radius = cert.radius()
    t_radius = time.perf_counter() - t0
    with CampaignStore(Path(a.run) / "campaign.sqlite") as store:
        rows = store.results()
    by_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_bit: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    unsound = 0
    t1 = time.perf_counter()
    for pf, res in rows:
        f = pf.fault
        o = Outcome.from_dict(res)
        old, new, noop = faulty_value(eng.model, f, eng._format(f))
        ok = (not noop) and cert.certifies(f, old, new)
        changed = o.flips > 0 or o.nonfinite
        for d in (by_layer[f.layer], by_bit[f.bits[-1]]):
            d[0] += 1
            d[1] += ok
            d[2] += ok and changed
        unsound += ok and changed
    t_cert = time.perf_counter() - t1
    out = {"run": a.run, "images": eng.n, "faults": len(rows), "safety": a.safety,
           "radius_seconds": round(t_radius, 1), "certify_seconds": round(t_cert, 1),
           "median_radius": float(sorted(radius)[len(radius) // 2]),
           "certified": sum(v[1] for v in by_layer.values()), "unsound": unsound,
           "layers": {k: v for k, v in by_layer.items()},
           "bits": {int(k): v for k, v in sorted(by_bit.items())},
           "certificates": cert.summary()}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
