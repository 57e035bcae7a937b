"""Share of a run's whole weight-fault population that is certified (BENCHMARKS §12).

    python benchmarks/bench_certified_share.py RUN [--images K] [--criterion C] [--json F]

Builds (or loads from ``RUN/certificates/``) the certificates of every layer on the run's
test images, then classifies every single-bit flip of every weight (all elements x all bits)
two ways: certified to change no decision, and certified not critical under ``--criterion``
(default ``accuracy-drop:0.01``: the images it cannot certify stay finite and cannot drop the
accuracy by more than 1 % even if they all flip). Prints the shares per layer and per bit.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _emit import emit

from flipguard.study.engines import RunEngineFactory


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--criterion", default="accuracy-drop:0.01")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    eng = RunEngineFactory(a.run, images=a.images, certify=True)()
    cert = eng.certifier
    setup = time.perf_counter() - t0
    bits = eng.fmt.bits
    layers, by_bit = [], np.zeros((bits, 3))
    t1 = time.perf_counter()
    for name in eng.program.calls:
        m = eng.model.get_submodule(name)
        if not hasattr(m, "weight"):
            continue
        numel = m.weight.numel()
        idx = np.arange(numel)
        row = {"layer": name, "N": numel * bits, "reason": cert.certificate(name).reason}
        strict = crit = 0
        for b in range(bits):
            bit = np.full(numel, b)
            s = int(cert.certified_sites(name, "weight", idx, bit).sum())
            c = int(cert.certified_sites(name, "weight", idx, bit, criterion=a.criterion).sum())
            strict, crit = strict + s, crit + c
            by_bit[b] += (numel, s, c)
        row.update(decisions=strict / row["N"], criterion=crit / row["N"])
        layers.append(row)
    N = sum(r["N"] for r in layers)
    summary = {
        "run": a.run, "images": eng.n, "criterion": a.criterion,
        "certificate_seconds": round(setup, 1),
        "classify_seconds": round(time.perf_counter() - t1, 1), "population": N,
        "decisions": sum(r["decisions"] * r["N"] for r in layers) / N,
        "under_criterion": sum(r["criterion"] * r["N"] for r in layers) / N,
        "layers": layers,
        "bits": [{"bit": b, "decisions": by_bit[b, 1] / by_bit[b, 0],
                  "criterion": by_bit[b, 2] / by_bit[b, 0]} for b in range(bits)],
    }

    def text() -> str:
        out = [f"{summary['images']} images; population {N:,}; certified: no decision changes "
               f"{100 * summary['decisions']:.2f} %, not critical under {a.criterion} "
               f"{100 * summary['under_criterion']:.2f} %"]
        out += [f"  {r['layer']:12s} {100 * r['decisions']:6.2f} % {100 * r['criterion']:6.2f} %"
                f"  {r['reason'] or ''}" for r in layers]
        out += [f"  bit {r['bit']:2d} {100 * r['decisions']:6.2f} % {100 * r['criterion']:6.2f} %"
                for r in summary["bits"]]
        return "\n".join(out)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
