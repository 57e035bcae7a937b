"""Resilience-aware architecture search (issue 17): the front, dominance of the default CAE,
Kendall tau between the RA rankings under uniform and hardware-aware exposure.

Runs ``flipguard nas`` (the Python API, same defaults) on a dataset — Magnetic-Tile at
64x64 for the BENCHMARKS table — and prints Markdown tables: the setting and the time it
took, the retrained networks (front + default CAE; validation objectives, RA intervals
under both exposures, test metrics), whether a front network dominates the default CAE
(quality >=, RA higher, memory <=), and the ranking agreement. A killed benchmark resumes
where it stopped when run again with the same arguments.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_nas.py \\
        --data ../shared/datasets/magnetic_tile --out runs/nas_mt --trials 30 --workers 2 \\
        --timeout 4800
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _emit import command, emit


def _stats(doc: dict[str, Any]) -> dict[str, Any]:
    sec = [it.get("seconds") or {} for it in doc.get("screened") or []]

    def mean(k: str) -> float | None:
        return round(sum(s.get(k, 0.0) for s in sec) / len(sec), 1) if sec else None

    return {"screened_networks": len(sec), "mean_train_s": mean("train"),
            "mean_ra_s": mean("ra"), "mean_trial_s": mean("total")}


def _text(summary: dict[str, Any]) -> str:
    from flipguard.nas.output import markdown_table

    doc = summary["doc"]
    cfg = doc["config"]
    hw = cfg["hardware"]
    lines = [f"```bash\n{summary['command']}\n```", "",
             "| setting | value |", "|---|---|"]
    st = summary["stats"]
    for k, v in [("data", cfg["data"]), ("image size", cfg["size"]),
                 ("train / calib / val normal / val defective",
                  " / ".join(str(doc["data"].get(k)) for k in
                             ("n_train", "n_calib", "n_val_normal", "n_val_defective"))),
                 ("objectives", ", ".join(cfg["objectives"])), ("sampler", cfg["sampler"]),
                 ("hardware-aware exposure", hw), ("trials per study", cfg["trials"]),
                 ("workers", cfg["workers"]),
                 ("screen: epochs / RA samples / margin",
                  f"{cfg['screen']['epochs']} / {cfg['screen']['ra_max_samples']} / "
                  f"±{cfg['screen']['ra_margin']}"),
                 ("front: epochs / RA samples / margin",
                  f"{cfg['full']['epochs']} / {cfg['full']['ra_max_samples']} / "
                  f"±{cfg['full']['ra_margin']}"),
                 ("complete trials", ", ".join(f"{n}: {s.get('complete')}"
                                               for n, s in doc["studies"].items())),
                 ("screened networks", st["screened_networks"]),
                 ("mean per screened network: train / RA / total s",
                  f"{st['mean_train_s']} / {st['mean_ra_s']} / {st['mean_trial_s']}"),
                 ("search time (both studies)", f"{doc['seconds']['search']:.0f} s"),
                 ("total wall time", f"{summary['wall_s']:.0f} s")]:
        lines.append(f"| {k} | {v} |")
    lines += ["", "Retrained networks (validation objectives; RA with its interval at "
              f"{cfg['settings']['confidence']:.0%}; test metrics):", "",
              markdown_table(summary["rows"])]
    dom = doc.get("dominates_baseline") or []
    base = doc.get("baseline") or {}
    sig = doc.get("dominates_baseline_significant") or []
    lines.append(f"Dominates the {base.get('name', 'baseline')} (quality >=, RA under {hw} "
                 f"higher, memory <=): {', '.join(dom) if dom else 'none'}; with the RA "
                 f"interval entirely above the baseline's: {', '.join(sig) if sig else 'none'}.")
    for level, r in (doc.get("rankings") or {}).items():
        diff = r["uniform_minus_hardware_ra"]
        lines.append(f"Ranking agreement ({level}, {r['networks']} networks): Kendall tau "
                     f"RA {r['ra']['tau']} (p {r['ra']['p_value']}), accuracy drop "
                     f"{r['drop']['tau']} (p {r['drop']['p_value']}); uniform − {hw} RA mean "
                     f"{diff['mean']}, positive for {diff['share_positive']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/datasets/magnetic_tile")
    ap.add_argument("--out", default="runs/nas_mt")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None, help="no new trial after this")
    ap.add_argument("--hardware", default="systolic")
    ap.add_argument("--objectives", default="quality,ra,memory")
    ap.add_argument("--sampler", default="tpe")
    ap.add_argument("--space", default="cae")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--screen-epochs", type=int, default=8)
    ap.add_argument("--screen-samples", type=int, default=256)
    ap.add_argument("--screen-margin", type=float, default=0.02)
    ap.add_argument("--full-epochs", type=int, default=30)
    ap.add_argument("--ra-margin", type=float, default=0.005)
    ap.add_argument("--ra-max-samples", type=int, default=2048)
    ap.add_argument("--ra-images", type=int, default=64)
    ap.add_argument("--front-max", type=int, default=4)
    ap.add_argument("--startup-trials", type=int, default=10)
    ap.add_argument("--save", default=None, help="write the summary JSON here")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from flipguard.nas import Fidelity, NASConfig, run_nas
    from flipguard.nas.output import front_rows

    cfg = NASConfig(data=a.data, out=a.out, trials=a.trials, timeout=a.timeout,
                    hardware=a.hardware, objectives=tuple(a.objectives.split(",")),
                    space=a.space, sampler=a.sampler, workers=a.workers, seed=a.seed,
                    size=a.size, startup_trials=a.startup_trials, front_max=a.front_max,
                    screen=Fidelity(a.screen_epochs, a.screen_margin, a.screen_samples,
                                    min(64, a.screen_samples)),
                    full=Fidelity(a.full_epochs, a.ra_margin, a.ra_max_samples,
                                  min(128, a.ra_max_samples)))
    cfg.settings.ra_images = a.ra_images
    t0 = time.perf_counter()
    doc = run_nas(cfg, progress=lambda stage, info: print(f"[{time.perf_counter() - t0:7.0f}s]"
                                                         f" {stage}: {info}", flush=True))
    summary = {"command": command("bench_nas.py", argv, "OMP_NUM_THREADS=1 PYTHONPATH=src "),
               "wall_s": time.perf_counter() - t0, "stats": _stats(doc),
               "rows": front_rows(doc, list(cfg.settings.hardware)), "doc": doc,
               "out": str(Path(a.out))}
    return emit(summary, a.save, a.json, lambda: _text(summary))


if __name__ == "__main__":
    main()
