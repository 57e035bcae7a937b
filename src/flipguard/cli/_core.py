"""Core verbs: synth, train, evaluate, demo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flipguard.cli._common import cli_errors, console, print_json

METRIC_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1",
    "precision",
    "recall",
    "accuracy",
    "threshold",
    "n_test",
)


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
    size: int = typer.Option(128, "--size", help="Input size (divisible by 16)."),
    channels: int | None = typer.Option(None, "--channels", help="1 or 3 (default: infer)."),
    width: float = typer.Option(1.0, "--width", help="CAE width multiplier."),
    latent: int = typer.Option(100, "--latent", help="Latent dimension."),
    epochs: int = typer.Option(50, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    lr: float = typer.Option(2e-4, "--lr"),
    loss: str = typer.Option("ssim", "--loss", help="l2 | ssim | l2+ssim"),
    score_map: str = typer.Option("ssim", "--map", help="Anomaly map: l2 | ssim"),
    smooth: float = typer.Option(2.0, "--smooth", help="Gaussian sigma of the map (0 = off)."),
    reduce: str = typer.Option("max", "--reduce", help="Image score: max | mean"),
    quantile: float = typer.Option(
        0.99, "--quantile", help="Threshold quantile of normal val scores."
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment"),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print metrics as JSON."),
) -> None:
    """Train a CAE anomaly detector, calibrate its threshold on normal data, evaluate it."""
    from flipguard.pipeline import train_detector

    with make_progress() as bar:
        run = train_detector(
            data,
            out,
            category=category,
            size=size,
            channels=channels,
            model={"width": width, "latent_dim": latent},
            train={
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "loss": loss,
                "augment": augment,
                "seed": seed,
            },
            score={"map": score_map, "smooth_sigma": smooth, "reduce": reduce},
            threshold_quantile=quantile,
            split_seed=seed,
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
    from flipguard.pipeline import evaluate_run

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
    from flipguard.demo import run_demo

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
