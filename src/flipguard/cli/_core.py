"""Core verbs: synth, train, evaluate, demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flipguard.cli._common import cli_errors, console, print_json
from flipguard.study.detector import (
    DETECTOR_DEFAULTS,
    check_cv_folds,
    check_options,
    detector_options,
    evaluate_run,
    train_detector,
)
from flipguard.threshold import check_threshold_args

METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1",
    "precision",
    "recall",
    "accuracy",
    "fpr",
    "threshold",
    "n_test",
    "infer_ms_per_image",
)


DEFAULTS = DETECTOR_DEFAULTS
"""Defaults of ``flipguard train`` (see :data:`flipguard.study.detector.DETECTOR_DEFAULTS`)."""
D = DEFAULTS


def make_progress() -> Progress:
    """A rich progress bar with rate/ETA on stderr."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class StageBars:
    """Adapter from ``pipeline.Progress`` callbacks to rich progress bars (one per stage)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any]) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, info="")
        text = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
        )
        self.progress.update(self.tasks[stage], completed=done, total=total, info=text)


def metrics_table(metrics: dict[str, Any], title: str = "Detector metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRIC_KEYS:
        val = metrics.get(key)
        text = (
            "unavailable" if val is None else (f"{val:.4f}" if isinstance(val, float) else str(val))
        )
        table.add_row(key, text)
    if metrics.get("oracle_f1") is not None:
        table.add_row("oracle_f1 (test-label threshold)", f"{metrics['oracle_f1']:.4f}")
    if metrics.get("oracle_accuracy") is not None:
        table.add_row("oracle_accuracy (same threshold)", f"{metrics['oracle_accuracy']:.4f}")
    if metrics.get("threshold_method"):
        fpr = metrics.get("target_fpr")
        rule = metrics["threshold_method"]
        if metrics.get("threshold_rule_used") not in (None, rule):
            rule += f" ({metrics['threshold_rule_used']})"
        rule += f", target fpr {fpr:g}" if fpr is not None else ""
        if metrics.get("cv_folds"):
            rule += (f", {metrics.get('threshold_scores')} out-of-fold scores "
                     f"({metrics['cv_folds']} folds)")
        table.add_row("threshold rule", rule)
    return table


def synth(
    out: Path = typer.Argument(..., help="Directory to create (MVTec layout)."),
    n_train: int = typer.Option(60, "--n-train", min=1, help="Normal training images."),
    n_test: int = typer.Option(40, "--n-test", min=1, help="Test images (normal + defective)."),
    size: int = typer.Option(128, "--size", min=8, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed => identical files)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
) -> None:
    """Generate a synthetic surface-defect dataset (scratches, cracks, blobs, exact masks)."""
    from flipguard.data import make_synthetic

    path = make_synthetic(
        out, n_train=n_train, n_test=n_test, size=size, seed=seed, overwrite=overwrite
    )
    console.print(f"synthetic dataset written to [bold]{path}[/]")


def train(
    data: Path = typer.Option(..., "--data", help="Dataset root in MVTec AD layout."),
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    category: str | None = typer.Option(None, "--category", help="Category sub-folder."),
    size: int = typer.Option(D["size"], "--size", help="Input size (divisible by 16)."),
    channels: int | None = typer.Option(None, "--channels", help="1 or 3 (default: infer)."),
    resize: str = typer.Option(
        D["resize"], "--resize", help="stretch (each axis to --size) | fit (keep aspect, pad)."
    ),
    width: float = typer.Option(D["width"], "--width", help="CAE width multiplier."),
    latent: int = typer.Option(
        D["latent"], "--latent",
        help="Latent size: vector length, or channels of the spatial latent map.",
    ),
    bottleneck: str = typer.Option(
        D["bottleneck"], "--bottleneck", help="vector (1x1 latent) | spatial (latent map)."
    ),
    latent_stride: int = typer.Option(
        D["latent_stride"], "--latent-stride", help="Spatial latent map side = size / 16 or / 8."
    ),
    memory: int = typer.Option(
        D["memory"], "--memory", min=0,
        help="MemAE memory items on the spatial latent (0 = none).",
    ),
    epochs: int = typer.Option(D["epochs"], "--epochs", min=1),
    batch_size: int = typer.Option(D["batch_size"], "--batch-size", min=1),
    lr: float = typer.Option(D["lr"], "--lr"),
    loss: str = typer.Option(D["loss"], "--loss",
                             help="l2 | ssim | l2+ssim | l2+ssim+msgms (RIAD)"),
    inpaint: float = typer.Option(
        D["inpaint"], "--inpaint",
        help="Share of training images given a synthetic defect to repair (0 = plain AE).",
    ),
    crop: int = typer.Option(
        D["crop"], "--crop", help="Patch training: random crop side (multiple of 16; 0 = off)."
    ),
    schedule: str = typer.Option(
        D["schedule"], "--schedule", help="Learning rate: constant | cosine (decay to 0)."
    ),
    ema: float = typer.Option(
        D["ema"], "--ema", help="Weight EMA decay kept as the final model (0 = off, e.g. 0.999)."
    ),
    score_map: str = typer.Option(
        D["map"], "--map",
        help="Anomaly map: l2 | ssim | msgms | auto (held-out normal images with pasted "
        "synthetic defects, never the test set: msgms unless another map leads by more than "
        "one standard error).",
    ),
    smooth: float = typer.Option(
        D["smooth"], "--smooth", help="Gaussian sigma of the map (0 = off)."
    ),
    reduce: str = typer.Option("max", "--reduce", help="Image score: max | mean"),
    ignore_margin: bool = typer.Option(
        D["ignore_margin"], "--ignore-margin/--no-ignore-margin",
        help="Score only each image's content, not the edge-replicated margin of --resize fit "
        "(with --reduce max).",
    ),
    standardize: bool = typer.Option(
        D["standardize"], "--standardize/--no-standardize",
        help="Per-position z-scores of the map against normal training images.",
    ),
    threshold: str | None = typer.Option(
        None, "--threshold",
        help="Threshold rule on normal validation scores for --fpr: auto (default: empirical "
        "if (n_val + 1) * fpr >= 2, else tail) | tail (fitted exponential tail) | empirical "
        "(distribution-free order statistic) | quantile (legacy) | mean+kstd.",
    ),
    fpr: float = typer.Option(
        D["fpr"], "--fpr",
        help="Target false-positive rate on normal images (auto/tail/empirical rules).",
    ),
    quantile: float | None = typer.Option(
        None, "--quantile", help="Legacy: threshold = this quantile of normal val scores "
        "(implies --threshold quantile).",
    ),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of train/good held out to calibrate the threshold."
    ),
    cv_folds: int = typer.Option(
        D["cv_folds"], "--cv-folds",
        help="K >= 2: hold out 1/K of train/good (instead of --val-fraction) and calibrate the "
        "threshold on out-of-fold scores of every train/good image from K - 1 more models "
        "(K - 1 extra trainings; 0 = off).",
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Train a CAE anomaly detector, calibrate its threshold on normal data, evaluate it."""
    method = threshold or ("quantile" if quantile is not None else "auto")
    q = 0.99 if quantile is None else quantile
    o = detector_options(width=width, latent=latent, bottleneck=bottleneck,
                         latent_stride=latent_stride, memory=memory, epochs=epochs,
                         batch_size=batch_size,
                         lr=lr, loss=loss, inpaint=inpaint, crop=crop, map=score_map,
                         smooth=smooth, standardize=standardize, schedule=schedule, ema=ema,
                         ignore_margin=ignore_margin and reduce == "max", cv_folds=cv_folds)
    model = o["model"]
    train_opts = {**o["train"], "augment": augment, "seed": seed}
    score = {**o["score"], "reduce": reduce}
    # one line, before anything is read or trained
    check_threshold_args(method, fpr, q, 3.0)
    check_options(size, resize, model, train_opts, score, val_fraction)
    check_cv_folds(cv_folds)
    with make_progress() as bar:
        run = train_detector(
            data,
            out,
            category=category,
            size=size,
            channels=channels,
            resize=resize,
            model=model,
            train=train_opts,
            score=score,
            threshold_method=method,
            threshold_fpr=fpr,
            threshold_quantile=q,
            val_fraction=val_fraction,
            split_seed=seed,
            cv_folds=cv_folds,
            progress=StageBars(bar),
        )
    if json_out:
        print_json(run.metrics)
    else:
        console.print(metrics_table(run.metrics))
        console.print(f"run written to [bold]{run.path}[/]")


def evaluate(
    run: Path = typer.Argument(..., help="Run directory."),
    data: Path | None = typer.Option(None, "--data", help="Evaluate on another dataset root."),
    json_out: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Evaluate a trained run: image/pixel AUROC, AUPRO, F1, accuracy at the threshold."""
    with make_progress() as bar:
        metrics = evaluate_run(run, data=data, progress=StageBars(bar))
    if json_out:
        print_json(metrics)
    else:
        console.print(metrics_table(metrics))


def demo(
    out: Path = typer.Option(Path("demo-run"), "--out", help="Directory for all demo outputs."),
    size: int = typer.Option(64, "--size", help="Image size of the synthetic data."),
    epochs: int = typer.Option(30, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """End-to-end demo on built-in synthetic data: synth → train → evaluate → campaign → report."""
    from flipguard.cli.demo import run_demo

    t0 = time.perf_counter()
    summary = run_demo(out, size=size, epochs=epochs, seed=seed)
    console.rule("[bold green]flipguard demo finished")
    for key, val in summary.items():
        console.print(f"{key}: [bold]{val}[/]")
    console.print(f"total time: {time.perf_counter() - t0:.1f} s")


def register(app: typer.Typer) -> None:
    """Add the core verbs to ``app``."""
    for fn in (synth, train, evaluate, demo):
        app.command(fn.__name__)(cli_errors(fn))
