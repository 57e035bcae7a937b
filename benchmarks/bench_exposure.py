"""Exposure models on a network: per-structure bit-cycles and shares of ``P``.

Builds ``P`` for the default Magnetic-Tile CAE (128 px grey, random weights and input; or
the model of ``--run RUN``) under each ``--hardware`` model and prints, per model, the
modelled cycles, ``P(weight)`` / ``P(activation)``, and per storage structure the raw
bit-cycles and the share of ``P``; plus the shares of raw upsets that SEC-DED corrects or
requantisation masks and the expected upsets per inference (docs/exposure-models.md).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_exposure.py \\
        --hardware uniform,memory,systolic --format fp32
"""

from __future__ import annotations

import argparse
import time

import torch
from _emit import command, emit


def _model(run: str | None) -> tuple[torch.nn.Module, torch.Tensor]:
    if run:
        from pathlib import Path

        from flipguard.study.resiliency import engine_for_run

        engine, _, _ = engine_for_run(Path(run), 1, "fp32", None)
        return engine.model, engine.inputs[:1]
    from flipguard.models import build_cae
    from flipguard.models.cae import CAEConfig

    net = build_cae(CAEConfig(input_size=128, channels=1)).eval()
    return net, torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run directory (default: a fresh CAE)")
    ap.add_argument("--hardware", default="uniform,memory,systolic")
    ap.add_argument("--targets", default="weight,activation")
    ap.add_argument("--format", default="fp32")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from flipguard.ra import build_exposure

    net, x = _model(args.run)
    targets = tuple(t for t in args.targets.split(",") if t)
    out: dict = {"command": command("bench_exposure.py", argv,
                                    "OMP_NUM_THREADS=1 PYTHONPATH=src "),
                 "format": args.format, "models": {}}
    for hw in (h for h in args.hardware.split(",") if h):
        t = time.perf_counter()
        p = build_exposure(net, x, hw, targets, args.format)
        info = p.info
        out["models"][hw] = {"build_s": time.perf_counter() - t, "cycles": info.get("cycles"),
                             "share": p.shares(), "structures": info.get("structures", {}),
                             "corrected_share": info.get("corrected_share"),
                             "masked_share": info.get("masked_share"),
                             "upsets_per_inference": info.get("upsets_per_inference"),
                             "stream_chunks": info.get("stream_chunks")}

    def text() -> str:
        lines = [f"`{out['command']}`", "",
                 "| model | build s | cycles | P(weight) | P(activation) | corrected | masked |",
                 "|---|---|---|---|---|---|---|"]
        for hw, m in out["models"].items():
            cyc = f"{m['cycles']:,.0f}" if m["cycles"] else "—"
            lines.append(f"| {hw} | {m['build_s']:.1f} | {cyc} | "
                         f"{m['share'].get('weight', 0):.3f} | "
                         f"{m['share'].get('activation', 0):.3f} | "
                         f"{m['corrected_share'] or 0:.3f} | {m['masked_share'] or 0:.3f} |")
        for hw, m in out["models"].items():
            if len(m["structures"]) <= 1:
                continue
            lines += ["", f"**{hw}** (upsets per inference: {m['upsets_per_inference']:.3g})",
                      "", "| structure | raw bit-cycles | weight | share of P |",
                      "|---|---|---|---|"]
            for s, d in m["structures"].items():
                lines.append(f"| {s} | {d['bit_cycles']:.3e} | {d['weight']:.3g} | "
                             f"{d['share']:.3f} |")
        return "\n".join(lines)

    return emit(out, args.save, args.json, text)


if __name__ == "__main__":
    main()
