"""The cross-validated threshold of a ``--cv-folds K`` run against the threshold its fold 0
alone would give (what a plain training with ``--val-fraction 1/K`` deploys: the model is the
same), under the same rules (diagnosis only: it reads the test labels).

    python benchmarks/cv_threshold.py runs/cv5_100 [RUN ...] [--fprs 0.05,0.1]

Per run and target FPR: the threshold from fold 0's validation scores and from all out-of-fold
scores (read back from ``RUN/threshold_scores.json``; a run written before that file existed
shows its deployed threshold at its own FPR only), with F1, accuracy and test FPR on the test
set, the ratio to the oracle F1, and the best F1 any threshold reaches at test FPR <= target.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from flipguard.data import split_folds
from flipguard.detect import reconstruct
from flipguard.metrics import threshold_metrics
from flipguard.study.rundir import load_run, load_threshold_scores
from flipguard.threshold import calibrate_threshold

try:
    from f1_bound import best_f1
except ImportError:  # run from the repository root
    from benchmarks.f1_bound import best_f1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--fprs", default="0.05,0.1")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    for path in a.runs:
        run = load_run(path)
        k = run.config.data.cv_folds
        if k < 2:
            raise SystemExit(f"{path}: not a --cv-folds run (config.json data.cv_folds = {k})")
        ds = run.load_data()
        kept = load_threshold_scores(path)
        if kept is not None:  # fold 0's scores come first
            v = np.asarray(kept[0][:kept[1][0]])
        else:
            fold0 = ds.train[torch.as_tensor(split_folds(len(ds.train), k,
                                                         run.config.data.split_seed)[0])]
            v = run.scorer.scores(fold0, reconstruct(run.model, fold0)).numpy()
        s = run.scorer.scores(ds.test, reconstruct(run.model, ds.test)).numpy()
        y = np.asarray(ds.test_labels)
        oracle = best_f1(s, y, 1.0)[0]
        print(f"{path}: {k} folds, fold 0 {v.size} scores, all {run.metrics['threshold_scores']}"
              f" scores; oracle F1 {oracle:.3f}; image AUROC {run.metrics['image_auroc']:.3f}")
        rule = run.config.threshold.method
        for fpr in (float(f) for f in a.fprs.split(",")):
            rows = [("fold 0 only", calibrate_threshold(v, method=rule, fpr=fpr))]
            deployed = fpr == run.config.threshold.fpr
            if kept is not None:
                rows.append(("out-of-fold" + (" (deployed)" if deployed else ""),
                             calibrate_threshold(np.asarray(kept[0]), method=rule, fpr=fpr)))
            elif deployed:
                rows.append(("out-of-fold (deployed)", run.threshold))
            for name, t in rows:
                m = threshold_metrics(y, s, t)
                fp_rate = m["fp"] / max(int((y == 0).sum()), 1)
                print(f"  fpr {fpr:g} {name:24s} threshold {t:8.4f}  F1 {m['f1']:.3f}  "
                      f"accuracy {m['accuracy']:.3f}  test FPR {fp_rate:.3f}  "
                      f"{m['f1'] / oracle:.2f}x oracle")
            cap_f1, cap_fpr = best_f1(s, y, fpr)
            print(f"  fpr {fpr:g} best at test FPR <= {fpr:g}: F1 {cap_f1:.3f} "
                  f"({cap_f1 / oracle:.2f}x, FPR {cap_fpr:.3f})")


if __name__ == "__main__":
    main()
