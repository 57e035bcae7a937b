"""Test-time flip averaging of anomaly maps (a detection lever; diagnosis only: it reads the
test labels to report AUROC).

    python benchmarks/tta_maps.py runs/mt250 [RUN ...]

Per run: the image AUROC of the run's own scores, and of scores from maps averaged over the
reconstructions of the image and of its horizontal / vertical flips (each map flipped back),
with the F1-optimal oracle F1 of each. No retraining; the run is only read.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flipguard.detect import reconstruct
from flipguard.metrics import best_f1_threshold, image_auroc
from flipguard.study.rundir import load_run

FLIPS: dict[str, tuple[int, ...]] = {"id": (), "h": (3,), "v": (2,), "hv": (2, 3)}


def flip_maps(run, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The run's anomaly maps of the flipped images, flipped back onto ``x``'s pixels."""
    xf = x.flip(dims) if dims else x
    m = run.scorer.maps(xf, reconstruct(run.model, xf))
    return m.flip(dims) if dims else m


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    for path in a.runs:
        run = load_run(path)
        ds = run.load_data()
        y = np.asarray(ds.test_labels)
        maps = {k: flip_maps(run, ds.test, d) for k, d in FLIPS.items()}
        for name, keys in (("plain", ["id"]), ("id+h+v", ["id", "h", "v"]),
                           ("id+h+v+hv", list(FLIPS))):
            s = run.scorer.reduce(torch.stack([maps[k] for k in keys]).mean(0)).numpy()
            f1 = best_f1_threshold(y, s)[0]
            print(f"{path} {name}: image AUROC {image_auroc(y, s):.3f}, oracle F1 {f1:.3f}")


if __name__ == "__main__":
    main()
