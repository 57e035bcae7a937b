"""Choose the anomaly map from normal data only, by how well its image scores separate
held-out normal images from copies of them with pasted synthetic defects
(:func:`flipguard.models.defects.paste_validation_defects`). No test image is ever used.

The validation set is small (tens of images) and its AUROCs are near 1, so differences
below their standard error are noise: the rule is the *one-standard-error rule* — the first
candidate in preference order (MS-GMS, the usual map of reconstruction detectors, then
SSIM, then L2) whose validation AUROC is within one (DeLong) standard error of the best.

Example::

    cfg, table = select_map(ScoreConfig(standardize=True), model, train_imgs, val_imgs)
    table   # {"ssim": 0.97, "msgms": 0.94, "l2": 0.91}: validation AUROC per candidate
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flipguard.detect import ScoreConfig, Scorer, fit_map_stats, reconstruct
from flipguard.metrics import auroc_se, image_auroc
from flipguard.models.defects import paste_validation_defects

__all__ = ["MAP_CANDIDATES", "choose_within_se", "select_map"]

MAP_CANDIDATES: tuple[str, ...] = ("msgms", "ssim", "l2")
"""Candidates in preference order (the first within one standard error of the best wins)."""


def choose_within_se(table: dict[str, float], order: tuple[str, ...], se: float) -> str:
    """The first name of ``order`` whose value in ``table`` is at least ``max - se``.

    Example:
        >>> choose_within_se({"msgms": 0.981, "ssim": 0.983, "l2": 0.84}, MAP_CANDIDATES, 0.012)
        'msgms'
        >>> choose_within_se({"msgms": 0.90, "ssim": 0.983, "l2": 0.84}, MAP_CANDIDATES, 0.012)
        'ssim'
    """
    best = max(table[n] for n in order)
    return next(n for n in order if table[n] >= best - se)


def select_map(
    cfg: ScoreConfig,
    model: nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    candidates: tuple[str, ...] = MAP_CANDIDATES,
    seed: int = 0,
) -> tuple[ScoreConfig, dict[str, float]]:
    """The map of ``candidates`` chosen by validation AUROC (normal ``val_images`` vs.
    defective copies) under the one-standard-error rule (see the module docstring); returns
    its config (standardisation fitted on ``train_images`` when ``cfg.standardize``) and the
    AUROC of every candidate.

    Example:
        >>> x = torch.rand(8, 1, 16, 16)
        >>> cfg, table = select_map(ScoreConfig(smooth_sigma=0), nn.Identity(), x, x)
        >>> sorted(table), cfg.map in table
        (['l2', 'msgms', 'ssim'], True)
    """
    bad, _ = paste_validation_defects(val_images, seed=seed)
    labels = np.r_[np.zeros(len(val_images)), np.ones(len(bad))]
    r_val, r_bad = reconstruct(model, val_images), reconstruct(model, bad)
    configs: dict[str, ScoreConfig] = {}
    table: dict[str, float] = {}
    ses: dict[str, float] = {}
    for name in candidates:
        c = cfg.model_copy(update={"map": name, "standardize": False, "norm_mean": None,
                                   "norm_std": None})
        if cfg.standardize:
            c = fit_map_stats(c, model, train_images)
        sc = Scorer(c)
        s = torch.cat([sc.scores(val_images, r_val), sc.scores(bad, r_bad)]).numpy()
        table[name] = round(float(image_auroc(labels, s)), 4)
        configs[name], ses[name] = c, auroc_se(labels, s)
    se = ses[max(table, key=lambda k: table[k])]
    return configs[choose_within_se(table, tuple(candidates), se)], table
