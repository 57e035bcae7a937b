"""End-to-end detector workflow: data → train → calibrate → evaluate → run directory.

Example::

    from flipguard.study.detector import train_detector, evaluate_run
    run = train_detector("data/synth", "runs/demo", model={"input_size": 64, "width": 0.5},
                         train={"epochs": 5})
    print(evaluate_run(run)["image_auroc"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flipguard.data import load_mvtec, split_folds, split_validation
from flipguard.data.mvtec import RESIZE_MODES, DatasetError
from flipguard.detect import ScoreConfig, Scorer, evaluate_detector, fit_map_stats, reconstruct
from flipguard.mapselect import select_map
from flipguard.models import CAEConfig, build_cae
from flipguard.study.crossval import fold_rest, fold_scores
from flipguard.study.initrun import task_metrics
from flipguard.study.rundir import (
    DataSection,
    ModelSection,
    Run,
    RunConfig,
    ThresholdSection,
    load_run,
    save_metrics,
    save_run,
    save_threshold_scores,
)
from flipguard.threshold import (
    MIN_TAIL_SCORES,
    calibrate_threshold,
    check_threshold_args,
    resolve_auto,
    score_stats,
)
from flipguard.train import TrainConfig, train_model

Progress = Callable[[str, int, int, dict[str, Any]], None]
"""progress(stage, done, total, info) — used by the CLI to drive progress bars."""


def _noop(stage: str, done: int, total: int, info: dict[str, Any]) -> None:
    return None


DETECTOR_DEFAULTS: dict[str, Any] = {
    "size": 128,
    "resize": "fit",
    "width": 1.0,
    "latent": 16,
    "bottleneck": "spatial",
    "latent_stride": 16,
    "memory": 0,
    "epochs": 100,
    "batch_size": 16,
    "lr": 1e-3,
    "loss": "l2+ssim+msgms",
    "inpaint": 0.5,
    "crop": 0,
    "schedule": "constant",
    "ema": 0.0,
    "map": "auto",
    "smooth": 2.0,
    "standardize": True,
    "ignore_margin": True,
    "fpr": 0.05,
    "cv_folds": 0,
}
"""The default detector (``flipguard train``, ``flipguard study``, the benchmarks)."""


def detector_options(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`train_detector` for the default detector, with
    ``overrides`` (keys of :data:`DETECTOR_DEFAULTS`) applied.

    >>> o = detector_options(size=32, epochs=2)
    >>> o["size"], o["train"]["epochs"], o["model"]["bottleneck"], o["threshold_fpr"]
    (32, 2, 'spatial', 0.05)
    """
    unknown = set(overrides) - set(DETECTOR_DEFAULTS)
    if unknown:
        raise TypeError(f"detector_options: unknown option {sorted(unknown)[0]!r}")
    d = {**DETECTOR_DEFAULTS, **overrides}
    return {
        "size": d["size"], "resize": d["resize"], "threshold_fpr": d["fpr"],
        "cv_folds": d["cv_folds"],
        "model": {"width": d["width"], "latent_dim": d["latent"], "bottleneck": d["bottleneck"],
                  "latent_stride": d["latent_stride"], "memory": d["memory"]},
        "train": {"epochs": d["epochs"], "batch_size": d["batch_size"], "lr": d["lr"],
                  "loss": d["loss"], "inpaint": d["inpaint"], "crop": d["crop"],
                  "schedule": d["schedule"], "ema": d["ema"]},
        "score": {"map": d["map"], "smooth_sigma": d["smooth"],
                  "standardize": d["standardize"], "ignore_margin": d["ignore_margin"]},
    }


def train_detector(
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    size: int = 128,
    channels: int | None = None,
    resize: str = "stretch",
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    score: dict[str, Any] | None = None,
    threshold_method: str = "auto",
    threshold_fpr: float = 0.05,
    threshold_quantile: float = 0.99,
    threshold_k: float = 3.0,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    cv_folds: int = 0,
    progress: Progress | None = None,
) -> Run:
    """Train a CAE detector on ``data`` (MVTec layout), calibrate, evaluate, save ``out``.

    The threshold comes from the scores of the held-out normal ``train/good`` images only
    (``val_fraction`` of them), for a false-positive rate of ``threshold_fpr``: by default the
    distribution-free order statistic when the validation set is large enough, else a fitted
    tail model (``"auto"``, see :mod:`flipguard.threshold`). ``cv_folds=K`` (>= 2) instead
    holds out fold 0 of a K-fold split (``val_fraction`` is then ignored) and calibrates on the
    out-of-fold scores of *all* ``train/good`` images, from K - 1 more models trained on the
    other folds (:mod:`flipguard.study.crossval`). Every option is validated before the data
    are read or anything is trained.
    """

    progress = progress or _noop
    check_threshold_args(threshold_method, threshold_fpr, threshold_quantile, threshold_k)
    tcfg, scfg, auto_map = check_options(size, resize, model, train, score, val_fraction)
    check_cv_folds(cv_folds)
    ds = load_mvtec(data, category=category, size=size, channels=channels, resize=resize)
    n_ch = int(ds.train.shape[1])
    mcfg = CAEConfig(**{"input_size": size, "channels": n_ch, "seed": tcfg.seed, **(model or {})})
    folds: list[Any] = []
    if cv_folds:
        folds = split_folds(len(ds.train), cv_folds, seed=split_seed)
        tr_idx, val_idx = fold_rest(folds, 0), folds[0]
        val_fraction = len(val_idx) / len(ds.train)
    else:
        val_fraction = _min_val_fraction(len(ds.train), val_fraction, threshold_method)
        tr_idx, val_idx = split_validation(len(ds.train), val_fraction=val_fraction,
                                           seed=split_seed)
    net = build_cae(mcfg)
    t0 = time.perf_counter()
    losses = train_model(
        net,
        ds.train[torch.as_tensor(tr_idx)],
        tcfg,
        progress=lambda epoch, loss: progress("train", epoch, tcfg.epochs, {"loss": loss}),
    )
    train_seconds = time.perf_counter() - t0
    net.eval()
    val_imgs = ds.train[torch.as_tensor(val_idx)]
    map_table: dict[str, float] | None = None
    if auto_map:  # normal data + pasted synthetic defects only

        scfg, map_table = select_map(scfg, net, ds.train[torch.as_tensor(tr_idx)], val_imgs,
                                     seed=split_seed)
    elif scfg.standardize:  # per-position map statistics of the normal training images
        scfg = fit_map_stats(scfg, net, ds.train[torch.as_tensor(tr_idx)])
    scorer = Scorer(scfg)
    val_scores = scorer.scores(val_imgs, reconstruct(net, val_imgs)).numpy()
    calib, cv = val_scores, {}
    if folds:
        extra, cv = fold_scores(ds.train, folds, mcfg, tcfg, scfg, progress=lambda k, e, n, loss:
                                progress(f"fold {k}/{len(folds) - 1}", e, n, {"loss": loss}))
        calib = np.concatenate([val_scores, extra])
    thr = calibrate_threshold(
        calib, quantile=threshold_quantile, method=threshold_method, k=threshold_k,
        fpr=threshold_fpr,
    )
    config = RunConfig(
        data=DataSection(
            path=str(Path(data).resolve()),
            category=category,
            size=size,
            channels=n_ch,
            resize=resize,
            val_fraction=val_fraction,
            split_seed=split_seed,
            cv_folds=cv_folds,
        ),
        model=ModelSection(kind="cae", params=mcfg.model_dump()),
        score=scfg.model_dump(),
        train=tcfg.model_dump(),
        threshold=ThresholdSection(
            value=float(thr),
            method=threshold_method,
            fpr=threshold_fpr if threshold_method in ("auto", "tail", "empirical") else None,
            rule_used=(resolve_auto(len(calib), threshold_fpr)
                       if threshold_method == "auto" else threshold_method),
            quantile=threshold_quantile,
            k=threshold_k,
            val_stats=score_stats(calib),
        ),
    )
    save_run(out, config, net)
    run = load_run(out)
    metrics = evaluate_run(run, dataset=ds, progress=progress)
    metrics.update(
        train_seconds=round(train_seconds, 2),
        train_images=len(tr_idx),
        val_images=len(val_idx),
        final_loss=float(losses[-1]) if losses else None,
        n_parameters=sum(p.numel() for p in net.parameters()),
        val_fpr=float((val_scores > thr).mean()),
        map=scfg.map,
        map_selection=map_table,
        threshold_scores=len(calib),
    )
    if folds:  # realised FPR of the threshold on each fold's held-out normal images
        bounds = np.cumsum([0] + cv["sizes"])
        metrics.update(cv_folds=cv_folds, cv_train_seconds=cv["train_seconds"],
                       cv_fold_fpr=[round(float((calib[a:b] > thr).mean()), 4)
                                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    save_threshold_scores(out, calib, cv["sizes"] if folds else [len(calib)])
    save_metrics(out, metrics)
    run.metrics = metrics
    return run


def check_options(
    size: int,
    resize: str,
    model: dict[str, Any] | None,
    train: dict[str, Any] | None,
    score: dict[str, Any] | None,
    val_fraction: float,
) -> tuple[Any, Any, bool]:
    """Validate every training option before any data are read (one-line errors); returns
    ``(TrainConfig, ScoreConfig, auto_map)`` where ``auto_map`` means ``score["map"] == "auto"``
    (the ScoreConfig then holds "ssim" until :func:`flipguard.mapselect.select_map` runs).

    Example:
        >>> check_options(64, "stretch", None, {"epochs": 2}, {"map": "auto"}, 0.1)[2]
        True
    """

    if resize not in RESIZE_MODES:
        raise DatasetError(f"resize: expected 'stretch' or 'fit' (got {resize!r})")
    tcfg = TrainConfig(**(train or {}))
    CAEConfig(**{"input_size": size, "seed": tcfg.seed, **(model or {})})
    score = dict(score or {})
    auto_map = score.get("map") == "auto"
    scfg = ScoreConfig(**{**score, "map": "ssim"} if auto_map else score)
    split_validation(2, val_fraction=val_fraction)
    return tcfg, scfg, auto_map


def evaluate_run(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    dataset: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a run on its test split: image/pixel AUROC, AUPRO, F1/accuracy at threshold."""

    if not isinstance(run, Run):
        run = load_run(run)
    ds = dataset if dataset is not None else run.load_data(data)
    if run.task_kind != "detection":
        return task_metrics(run.model, ds, run.config.task)
    progress = progress or _noop
    t0 = time.perf_counter()
    metrics = evaluate_detector(
        run.model,
        run.scorer,
        run.threshold,
        ds.test,
        ds.test_labels,
        ds.test_masks,
        progress=lambda done, total: progress("evaluate", done, total, {}),
    )
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    metrics["pixel_metrics"] = "available" if ds.test_masks is not None else "unavailable"
    th = run.config.threshold
    metrics["threshold_method"] = th.method
    metrics["threshold_rule_used"] = th.rule_used
    metrics["target_fpr"] = th.fpr
    oracle = metrics.get("oracle_f1")
    metrics["f1_vs_oracle"] = metrics["f1"] / oracle if oracle else None
    return metrics


def check_cv_folds(cv_folds: int) -> int:
    """Validate ``cv_folds``: 0 (off) or an integer >= 2; one-line :class:`DatasetError`.

    >>> check_cv_folds(5)
    5
    """
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 0 \
            or cv_folds == 1:
        raise DatasetError(f"cv_folds: expected 0 (off) or an integer >= 2 (got {cv_folds!r})")
    return cv_folds


def _min_val_fraction(n: int, val_fraction: float, method: str) -> float:
    """The tail threshold needs >= MIN_TAIL_SCORES validation images: raise the fraction to
    that count when ``train/good`` has at least twice as many images (else keep it)."""

    enough = round(n * val_fraction) >= MIN_TAIL_SCORES
    if method not in ("tail", "auto") or enough or n < 2 * MIN_TAIL_SCORES:
        return val_fraction
    return (MIN_TAIL_SCORES + 0.25) / n  # round(n * f) == MIN_TAIL_SCORES
