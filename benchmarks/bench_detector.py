"""Train and evaluate the default CAE detector on an MVTec-layout dataset; print a table.

    python benchmarks/bench_detector.py --data ../shared/datasets/magnetic_tile \
        --out runs/magnetic_tile --epochs 120

Equivalent CLI: ``flipguard train --data DATA --out OUT --epochs 120 ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from flipguard.pipeline import train_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/datasets/magnetic_tile")
    ap.add_argument("--out", default="runs/magnetic_tile")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--loss", default="ssim")
    ap.add_argument("--map", default="ssim")
    ap.add_argument("--smooth", type=float, default=4.0)
    ap.add_argument("--latent", type=int, default=100)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def progress(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "train" and (done % 10 == 0 or done == total):
            print(f"epoch {done}/{total} loss={info.get('loss', 0):.4f} "
                  f"t={time.perf_counter() - t0:.0f}s", flush=True)

    run = train_detector(
        args.data,
        args.out,
        size=args.size,
        model={"width": args.width, "latent_dim": args.latent},
        train={"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "loss": args.loss, "augment": True, "seed": 0},
        score={"map": args.map, "smooth_sigma": args.smooth, "reduce": "max"},
        progress=progress,
    )
    m = run.metrics
    print(json.dumps(m, indent=2))
    print("\n| metric | value |\n|---|---|")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy", "threshold",
                "n_test", "train_seconds", "n_parameters"):
        print(f"| {key} | {m.get(key)} |")
    print(f"\nthreads={torch.get_num_threads()} total={time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
