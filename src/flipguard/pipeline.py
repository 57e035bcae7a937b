"""End-to-end detector workflow: data → train → calibrate → evaluate → run directory.

Example::

    from flipguard.pipeline import train_detector, evaluate_run
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

from flipguard.run import (
    DataSection,
    ModelSection,
    Run,
    RunConfig,
    ThresholdSection,
    load_run,
    save_metrics,
    save_run,
)

Progress = Callable[[str, int, int, dict[str, Any]], None]
"""progress(stage, done, total, info) — used by the CLI to drive progress bars."""


def _noop(stage: str, done: int, total: int, info: dict[str, Any]) -> None:
    return None


def train_detector(
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    size: int = 128,
    channels: int | None = None,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    score: dict[str, Any] | None = None,
    threshold_quantile: float = 0.99,
    threshold_method: str = "quantile",
    threshold_k: float = 3.0,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    progress: Progress | None = None,
) -> Run:
    """Train a CAE detector on ``data`` (MVTec layout), calibrate, evaluate, save ``out``."""
    from flipguard.data import load_mvtec, split_validation
    from flipguard.detect import ScoreConfig, Scorer, calibrate_threshold, reconstruct
    from flipguard.models import CAEConfig, build_cae
    from flipguard.train import TrainConfig, train_model

    progress = progress or _noop
    ds = load_mvtec(data, category=category, size=size, channels=channels)
    n_ch = int(ds.train.shape[1])
    tcfg = TrainConfig(**(train or {}))
    mcfg = CAEConfig(**{"input_size": size, "channels": n_ch, "seed": tcfg.seed, **(model or {})})
    scfg = ScoreConfig(**(score or {}))
    tr_idx, val_idx = split_validation(len(ds.train), val_fraction=val_fraction, seed=split_seed)
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
    scorer = Scorer(scfg)
    val_imgs = ds.train[torch.as_tensor(val_idx)]
    val_scores = scorer.scores(val_imgs, reconstruct(net, val_imgs)).numpy()
    thr = calibrate_threshold(
        val_scores, quantile=threshold_quantile, method=threshold_method, k=threshold_k
    )
    config = RunConfig(
        data=DataSection(
            path=str(Path(data).resolve()),
            category=category,
            size=size,
            channels=n_ch,
            val_fraction=val_fraction,
            split_seed=split_seed,
        ),
        model=ModelSection(kind="cae", params=mcfg.model_dump()),
        score=scfg.model_dump(),
        train=tcfg.model_dump(),
        threshold=ThresholdSection(
            value=float(thr),
            method=threshold_method,
            quantile=threshold_quantile,
            k=threshold_k,
            val_stats=_stats(val_scores),
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
    )
    save_metrics(out, metrics)
    run.metrics = metrics
    return run


def evaluate_run(
    run: Run | str | Path,
    *,
    data: str | Path | None = None,
    dataset: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a run on its test split: image/pixel AUROC, AUPRO, F1/accuracy at threshold."""
    from flipguard.detect import evaluate_detector

    if not isinstance(run, Run):
        run = load_run(run)
    ds = dataset if dataset is not None else run.load_data(data)
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
    return metrics


def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    return {
        "n": float(x.size),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
    }
