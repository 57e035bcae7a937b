"""Cross-validated threshold scores: every ``train/good`` image scored by a model that did not
train on it.

With ``K`` folds the deployed detector is fold 0's model (trained on the other ``K - 1`` folds,
its validation set is fold 0); ``K - 1`` more models, trained the same way (same recipe, seed and
training-set size, so exchangeable with the deployed one), each score the fold they left out.
The threshold is then calibrated on ``n`` out-of-fold scores instead of ``n / K``: the
order statistic that sets a target false-positive rate is ``K`` times better sampled (the
realised rate of an empirical ``fpr`` threshold from ``m`` scores has s.d. about
``sqrt(fpr (1 - fpr) / m)``). It costs ``K - 1`` extra trainings.

Example::

    scores, info = fold_scores(images, folds, mcfg, tcfg, scfg)   # out-of-fold, fold >= 1
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flipguard.detect import ScoreConfig, Scorer, fit_map_stats, reconstruct
from flipguard.models import CAEConfig, build_cae
from flipguard.train import TrainConfig, train_model

__all__ = ["fold_scores", "fold_rest"]

FoldProgress = Callable[[int, int, int, float], None]
"""progress(fold, epoch, epochs, loss)"""


def fold_rest(folds: list[np.ndarray], k: int) -> np.ndarray:
    """Indices of every fold but ``k`` (the training images of fold ``k``'s model).

    >>> fold_rest([np.array([0, 3]), np.array([1]), np.array([2])], 0).tolist()
    [1, 2]
    """
    return np.sort(np.concatenate([f for i, f in enumerate(folds) if i != k]))


def fold_scores(images: torch.Tensor, folds: list[np.ndarray], mcfg: CAEConfig,
                tcfg: TrainConfig, scfg: ScoreConfig,
                progress: FoldProgress | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores of the images of folds ``1 .. K-1``, each from a model trained on the other
    folds with ``mcfg`` / ``tcfg`` and scored with ``scfg``'s map (its standardisation, if
    any, refitted on that model's own training images, as the deployed model's was).
    Returns the scores in fold order (fold 1's images, then fold 2's, ...) and per-fold
    facts (``train_seconds``, ``sizes``).
    """
    plain = scfg.model_copy(update={"norm_mean": None, "norm_std": None})
    out: list[np.ndarray] = []
    seconds: list[float] = []
    for k in range(1, len(folds)):
        rest = torch.as_tensor(fold_rest(folds, k))
        held = images[torch.as_tensor(folds[k])]
        net = build_cae(mcfg)
        t0 = time.perf_counter()
        train_model(net, images[rest], tcfg, progress=None if progress is None else
                    lambda epoch, loss, k=k: progress(k, epoch, tcfg.epochs, loss))
        seconds.append(round(time.perf_counter() - t0, 2))
        net.eval()
        cfg = fit_map_stats(plain, net, images[rest]) if scfg.standardize else plain
        out.append(Scorer(cfg).scores(held, reconstruct(net, held)).numpy())
    info = {"train_seconds": seconds, "sizes": [int(f.size) for f in folds]}
    return np.concatenate(out) if out else np.zeros(0), info
