"""Best F1 any threshold could reach on a run's test scores, unconstrained and under a cap on
the test false-positive rate (diagnosis only: it reads the test labels).

    python benchmarks/f1_bound.py runs/mt_detector_fit250 [RUN ...] [--caps 0.05,0.1]

Prints, per run, the best F1 with its test FPR and its ratio to the unconstrained best
(the "oracle" F1 of ``flipguard evaluate``): the upper bound of what a threshold set from
normal data at that false-positive target can deliver.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flipguard.detect import reconstruct
from flipguard.study.rundir import load_run


def best_f1(scores: np.ndarray, labels: np.ndarray, cap: float) -> tuple[float, float]:
    """``(F1, FPR)`` of the best threshold ``score > t`` with test FPR <= ``cap``.

    >>> best_f1(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]), 1.0)
    (1.0, 0.0)
    """
    out = (0.0, 0.0)
    neg = max(int((labels == 0).sum()), 1)
    for t in np.concatenate([[-np.inf], np.unique(scores)]):
        pred = scores > t
        tp = int((pred & (labels == 1)).sum())
        fp = int((pred & (labels == 0)).sum())
        fn = int((~pred & (labels == 1)).sum())
        f1, fpr = 2 * tp / max(2 * tp + fp + fn, 1), fp / neg
        if fpr <= cap and f1 > out[0]:
            out = (f1, fpr)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--caps", default="0.05,0.1")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    caps = [float(c) for c in a.caps.split(",")]
    for path in a.runs:
        run = load_run(path)
        ds = run.load_data()
        s = run.scorer.scores(ds.test, reconstruct(run.model, ds.test)).numpy()
        y = np.asarray(ds.test_labels)
        top = best_f1(s, y, 1.0)[0]
        cells = [f"fpr<={c:g}: F1 {f:.3f} (FPR {r:.3f}, {f / top:.2f}x)"
                 for c in caps for f, r in [best_f1(s, y, c)]]
        print(f"{path}: oracle F1 {top:.3f}; " + "; ".join(cells))


if __name__ == "__main__":
    main()
