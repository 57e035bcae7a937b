"""Certificates at cuts: simulated images dropped mid-network once their change is proven
harmless (BENCHMARKS §12).

    OMP_NUM_THREADS=1 python benchmarks/bench_cut_certify.py RUN [--per-layer 8] [--images N]
        [--layers a,b] [--plan-faults 571] [--seed 0] [--certificates F] [--json] [--save F]

The same faults (``--per-layer`` per weight layer, uniform over index and bit; FP32 flips)
through three engines over the run's test images, fault by fault in turn: plain
simulation, the certified engine with layer certificates only (``Certifier(cut_levels=())``)
and with cut certificates too (the default). Per layer: seconds per fault, the share of
(fault, image) pairs certified and whether every decision equals plain simulation.
``--plan-faults``: the faults per layer of the campaign being modelled, so layer
certificates are computed only where they would pay there (as ``flipguard campaign run
--certify`` decides).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _emit import command, emit

from flipguard.faults import Fault, SiteSpace
from flipguard.inject import Engine
from flipguard.inject.certify import Certifier
from flipguard.study.engines import RunEngineFactory, task_for


def _faults(model: torch.nn.Module, per_layer: int, layers: list[str] | None, seed: int):
    space = SiteSpace(model)
    rng = np.random.default_rng(seed)
    names = [n for n in space.names if layers is None or n in layers]
    return [Fault(s.target, s.layer, s.index, (s.bit,))
            for n in names for s in space.sample(rng, per_layer, n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--plan-faults", type=int, default=571)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--certificates", default=None,
                    help="layer certificates file: read if it exists, else written")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    a = ap.parse_args(argv)
    p = RunEngineFactory(a.run, images=a.images).parts()
    layers = a.layers.split(",") if a.layers else None
    faults = _faults(p.run.model, a.per_layer, layers, a.seed)
    plan = {f.layer: a.plan_faults for f in faults}

    task = task_for(p.run, p.labels)
    tables = Path(a.certificates or Path(tempfile.mkdtemp()) / "layer_certificates.npz")
    phases = ("plain", "layer certificates", "layer + cut certificates")
    engines, setup, cuts = {}, {}, {}
    for name in phases:
        eng = Engine(p.run.model, p.inputs, task, certify=name != "plain").prepare()
        t0 = time.perf_counter()
        if name == "layer certificates":  # computed once (or read), shared with the next
            eng.certifier = Certifier(eng, faults=plan, cut_levels=())
            if tables.exists():
                eng.certifier.load(tables)
            for layer in plan:
                eng.certifier.certificate(layer)
            eng.certifier.save(tables)
        elif name != "plain":
            eng.certifier = Certifier(eng, faults=plan).load(tables)
            cuts = {int(k): float((v > 0).mean()) for k, v in eng.certifier.cut_radii().items()}
        setup[name] = time.perf_counter() - t0
        engines[name] = eng
    res: dict[str, tuple[list, list[float]]] = {n: ([], []) for n in phases}
    for f in faults:  # interleaved: a busy machine slows every phase alike
        for name in phases:
            t0 = time.perf_counter()
            res[name][0].append(engines[name].run([f])[0])
            res[name][1].append(time.perf_counter() - t0)
    ref = res["plain"][0]
    per: dict[str, dict] = defaultdict(dict)
    for name, (outs, secs) in res.items():  # per layer, against plain simulation
        by: dict[str, list] = defaultdict(list)
        for f, o, s, r in zip(faults, outs, secs, ref, strict=True):
            by[f.layer].append((o, s, r))
        for layer, rows in by.items():
            pairs = sum(o.n_images + o.n_certified for o, _, _ in rows)
            per[layer][name] = {
                "s_per_fault": float(np.mean([s for _, s, _ in rows])),
                "certified_share": sum(o.n_certified for o, _, _ in rows) / max(1, pairs),
                "same_decisions": all(o.same_decisions(r) for o, _, r in rows)}
    total = {name: float(sum(secs)) for name, (_, secs) in res.items()}
    summary = {"command": command("bench_cut_certify.py", argv, "OMP_NUM_THREADS=1 "),
               "run": a.run, "images": int(p.inputs.shape[0]), "faults": len(faults),
               "threads": torch.get_num_threads(), "setup_s": setup, "total_s": total,
               "cut_share_of_images": cuts, "layers": per}

    def text() -> str:
        names = list(phases)
        lines = [summary["command"], "",
                 "| layer | " + " | ".join(f"{n}: s/fault (certified pairs)" for n in names)
                 + " | decisions identical |", "|---|" + "---:|" * len(names) + "---|"]
        for layer, d in per.items():
            cells = [f"{d[n]['s_per_fault']:.2f} ({100 * d[n]['certified_share']:.1f} %)"
                     for n in names]
            same = all(d[n]["same_decisions"] for n in names)  # vs plain simulation
            lines.append(f"| {layer} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
        lines.append("| **all** | " + " | ".join(f"{total[n]:.0f} s" for n in names) + " | |")
        lines.append("")
        lines.append("set-up s: " + ", ".join(f"{k} {v:.0f}" for k, v in setup.items()))
        lines.append(f"{len(faults)} faults, {summary['images']} images, "
                     f"{summary['threads']} thread(s)")
        return "\n".join(lines)

    return emit(summary, a.save, a.json, text)


if __name__ == "__main__":
    main()
