"""`flipguard nas`: resilience-aware architecture search (docs/nas.md).

Optuna multi-objective search (TPE by default, NSGA-II with ``--sampler nsga2``) over a
search space (``--space``: the CAE family, the digits-CNN example or ``pkg.module:name``),
objectives from validation data only (quality, RA under ``--hardware`` exposure, memory,
MACs), trials in ``OUT/nas.sqlite`` (the same command resumes), the same search under
uniform exposure beside it, the front retrained and tested with the baseline on the same
axes. Results: ``OUT/nas.json``, ``front.md``/``front.csv``, ``front.png``, ``report.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flipguard.cli._common import cli_errors, console, print_json


def nas(
    data: Path = typer.Option(..., "--data", help="MVTec-layout dataset (detection spaces) or "
                              ".pt with 'inputs'/'labels' (+ optional 'test_inputs'/"
                              "'test_labels') for classification spaces."),
    out: Path = typer.Option(..., "--out", help="Search directory (storage, cache, results)."),
    trials: int = typer.Option(30, "--trials", help="Complete trials per study."),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds after which no new "
                                         "trial starts (the front is still retrained)."),
    hardware: str = typer.Option("systolic", "--hardware", help="uniform | memory | systolic "
                                 "| systolic:FILE.toml | FILE.toml (hardware-aware exposure)."),
    objectives: str = typer.Option("quality,ra,memory", "--objectives",
                                   help="Comma list of quality, ra, drop, memory, macs."),
    space: str = typer.Option("cae", "--space", help="cae | digits | pkg.module:name."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (multi-objective TPE) | nsga2."),
    workers: int = typer.Option(1, "--workers", help="Trial processes (one thread each)."),
    seed: int = typer.Option(0, "--seed", help="Seed of samplers, splits, defects, training."),
    size: int = typer.Option(64, "--size", help="Image side (detection)."),
    category: str | None = typer.Option(None, "--category", help="MVTec category."),
    uniform: bool = typer.Option(True, "--uniform/--no-uniform",
                                 help="Run the same search under uniform exposure beside it."),
    screen_epochs: int = typer.Option(8, "--screen-epochs", help="Training epochs per trial."),
    screen_samples: int = typer.Option(256, "--screen-samples", help="RA samples per trial."),
    screen_margin: float = typer.Option(0.02, "--screen-margin",
                                        help="RA half-width at which a trial stops sampling."),
    full_epochs: int = typer.Option(30, "--full-epochs", help="Epochs for the front."),
    ra_margin: float = typer.Option(0.005, "--ra-margin", help="Target RA half-width (front)."),
    ra_max_samples: int = typer.Option(2048, "--ra-max-samples", help="RA budget (front)."),
    ra_images: int = typer.Option(64, "--ra-images", help="Validation inputs of RA."),
    confidence: float = typer.Option(0.95, "--confidence", help="RA interval level."),
    front_max: int = typer.Option(4, "--front-max", help="Front networks retrained per study."),
    fmt: str = typer.Option("fp32", "--format", help="Stored number format: fp32 | fp16 | "
                            "bf16 | int8 (memory bits, faults)."),
    quality: str = typer.Option("image_auroc", "--quality",
                                help="image_auroc | pixel_auroc | aupro | accuracy."),
    threshold: str = typer.Option("synthetic", "--threshold", help="synthetic (accuracy-"
                                  "optimal on calibration normals + pasted defects) | tail | "
                                  "empirical | quantile (normal calibration images only)."),
    fpr: float = typer.Option(0.05, "--fpr", help="Target false-positive rate (tail, "
                              "empirical)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of train/good held "
                                       "out (half calibration, half validation)."),
    defect_strength: float = typer.Option(2.0, "--defect-strength", help="Pasted defects' "
                                          "shift in units of the image's std."),
    score_map: str = typer.Option("ssim", "--map", help="Anomaly map: ssim | l2 | msgms."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize",
                                     help="Standardise maps per position (training maps)."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (detection)."),
    loss: str = typer.Option("l2+ssim", "--loss", help="l2 | ssim | l2+ssim (detection)."),
    inpaint: float = typer.Option(0.0, "--inpaint", help="Inpainting share of training "
                                  "images (detection; see flipguard train)."),
    startup: int = typer.Option(10, "--startup-trials", help="Random trials before TPE."),
    population: int = typer.Option(10, "--population", help="NSGA-II population."),
    no_retrain: bool = typer.Option(False, "--no-retrain", help="Skip the full retraining."),
    json_out: bool = typer.Option(False, "--json", help="Print nas.json to stdout."),
) -> None:
    """Resilience-aware architecture search: a Pareto front of quality, RA and memory."""
    from flipguard.nas import Fidelity, NASConfig, run_nas

    cfg = NASConfig(data=str(data), out=str(out), trials=trials, timeout=timeout,
                    hardware=hardware, compare_uniform=uniform,
                    objectives=tuple(o for o in objectives.split(",")), space=space,
                    sampler=sampler, workers=workers, seed=seed, size=size, category=category,
                    val_fraction=val_fraction, defect_strength=defect_strength,
                    startup_trials=startup, population=population, front_max=front_max,
                    retrain=not no_retrain,
                    screen=Fidelity(screen_epochs, screen_margin, screen_samples,
                                    min(64, screen_samples)),
                    full=Fidelity(full_epochs, ra_margin, ra_max_samples,
                                  min(128, ra_max_samples)))
    s = cfg.settings
    s.fmt, s.ra_images, s.confidence, s.quality = fmt, ra_images, confidence, quality
    s.train = {**s.train, "lr": lr, "loss": loss, "inpaint": inpaint}
    s.score = {**s.score, "map": score_map, "standardize": standardize}
    s.threshold = {"method": threshold} if threshold == "synthetic" else \
        {"method": threshold, "fpr": fpr}
    cfg.validate()

    def show(stage: str, info: dict[str, Any]) -> None:
        if not json_out:
            console.print(f"{stage}: {info}", highlight=False)

    doc = run_nas(cfg, progress=show)
    if json_out:
        print_json(doc)
        return
    console.print(_table(doc, list(cfg.settings.hardware)))
    for level, r in (doc.get("rankings") or {}).items():
        console.print(f"Kendall tau uniform vs {cfg.hardware} ({level}, {r['networks']} "
                      f"networks): RA {r['ra']['tau']}, drop {r['drop']['tau']}")
    console.print(f"saved {doc['files']['json']}, {doc['files']['figure']}")


def _table(doc: dict[str, Any], hardware: list[str]) -> Table:
    from flipguard.nas.output import front_rows

    t = Table(title="Retrained networks (validation objectives; test metrics)")
    cols = ["network", "architecture", "on_front", "val_quality", "memory_bits"]
    cols += [f"ra_{hw}" for hw in hardware] + ["test_image_auroc"]
    for c in cols:
        t.add_column(c)
    for r in front_rows(doc, hardware):
        t.add_row(*[(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")))
                    for c in cols])
    return t


def register(app: typer.Typer) -> None:
    """Add the ``nas`` command to ``app``."""
    app.command("nas")(cli_errors(nas))
