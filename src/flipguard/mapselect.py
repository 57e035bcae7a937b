"""Choose the anomaly map from normal data only: the map whose image scores best separate
held-out normal images from copies of them with pasted synthetic defects
(:func:`flipguard.models.defects.paste_validation_defects`). No test image is ever used.

Example::

    cfg, table = select_map(ScoreConfig(standardize=True), model, train_imgs, val_imgs)
    table   # {"ssim": 0.97, "msgms": 0.94, "l2": 0.91}: validation AUROC per candidate
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flipguard.detect import ScoreConfig, Scorer, fit_map_stats, reconstruct
from flipguard.metrics import image_auroc
from flipguard.models.defects import paste_validation_defects

__all__ = ["MAP_CANDIDATES", "select_map"]

MAP_CANDIDATES: tuple[str, ...] = ("ssim", "msgms", "l2")
"""Candidates in tie-break order (the first of equal AUROCs wins)."""


def select_map(
    cfg: ScoreConfig,
    model: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    candidates: tuple[str, ...] = MAP_CANDIDATES,
    seed: int = 0,
) -> tuple[ScoreConfig, dict[str, float]]:
    """Best map of ``candidates`` by validation AUROC (normal ``val_images`` vs. defective
    copies); returns its config (standardisation fitted on ``train_images`` when
    ``cfg.standardize``) and the AUROC of every candidate.

    Example:
        >>> x = torch.rand(8, 1, 16, 16)
        >>> cfg, table = select_map(ScoreConfig(smooth_sigma=0), nn.Identity(), x, x)
        >>> sorted(table), cfg.map in table
        (['l2', 'msgms', 'ssim'], True)
    """
    bad, _ = paste_validation_defects(val_images, seed=seed)
    labels = np.r_[np.zeros(len(val_images)), np.ones(len(bad))]
    r_val, r_bad = reconstruct(model, val_images), reconstruct(model, bad)
    best: tuple[float, ScoreConfig] | None = None
    table: dict[str, float] = {}
    for name in candidates:
        c = cfg.model_copy(update={"map": name, "standardize": False, "norm_mean": None,
                                   "norm_std": None})
        if cfg.standardize:
            c = fit_map_stats(c, model, train_images)
        sc = Scorer(c)
        s = torch.cat([sc.scores(val_images, r_val), sc.scores(bad, r_bad)]).numpy()
        auc = image_auroc(labels, s)
        table[name] = round(float(auc), 4)
        if best is None or auc > best[0]:
            best = (auc, c)
    assert best is not None
    return best[1], table
