"""`flipguard study ROOT --out DIR`: train → campaign → CFR → harden → report for every
object of an MVTec-layout root, then the figures across objects (DIR/study.html)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from flipguard.cli._common import console, escape, print_json
from flipguard.cli.campaign import PlanOptions
from flipguard.cli.options import command
from flipguard.study.campaigns import CampaignOptions
from flipguard.study.detector import DETECTOR_DEFAULTS as D
from flipguard.study.detector import detector_options
from flipguard.study.objects import STAGES, StudyOptions, run_study


def _view(stages: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="study")
    table.add_column("object")
    for s in STAGES:
        table.add_column(s, justify="center")
    for name, st in stages.items():
        cells = []
        for s in STAGES:
            v = st.get(s)
            cells.append("[green]done" if v and v.get("done") else
                         "[red]failed" if v else "·")
        table.add_row(escape(name), *cells)
    return table


@command
def study(root: Path = typer.Argument(..., help="MVTec-layout root (or one category)."),
          *, plan: PlanOptions,
          out: Path = typer.Option(..., "--out", help="Study directory."),
          categories: str | None = typer.Option(None, "--categories",
                                                help="Comma list (default: every object)."),
          size: int = typer.Option(D["size"], "--size", min=8, help="Image size for training."),
          resize: str = typer.Option(D["resize"], "--resize",
                                     help="stretch | fit (keep aspect, pad)."),
          width: float = typer.Option(D["width"], "--width", help="CAE width multiplier."),
          epochs: int = typer.Option(D["epochs"], "--epochs", min=1, help="Training epochs."),
          fpr: float = typer.Option(D["fpr"], "--fpr", help="Target false-positive rate of the "
                                    "threshold (normal data only)."),
          cv_folds: int = typer.Option(D["cv_folds"], "--cv-folds", help="K >= 2: threshold "
                                       "from out-of-fold scores of K models (see train)."),
          images: int | None = typer.Option(None, "--images", min=1,
                                            help="Test images per fault (default all)."),
          budget: float | None = typer.Option(0.03, "--budget", help="Hardening memory "
                                              "budget (fraction); negative skips hardening."),
          workers: int = typer.Option(1, "--workers", min=1, help="Objects at a time."),
          ray: str | None = typer.Option(None, "--ray", help="auto | local | ADDRESS"),
          json_out: bool = typer.Option(False, "--json", help="Print study.json.")) -> None:
    """Every stage for every object (resumable per stage and object), then DIR/study.html
    and DIR/study.json with per-object and aggregate rows."""
    cfg = plan.config()
    opts = StudyOptions(
        categories=tuple(c.strip() for c in categories.split(",") if c.strip())
        if categories else None,
        train=detector_options(size=size, resize=resize, width=width, epochs=epochs, fpr=fpr,
                               cv_folds=cv_folds),
        plan=cfg, campaign=CampaignOptions(images=images), criterion=cfg.criterion,
        budget=None if budget is not None and budget < 0 else budget, workers=workers, ray=ray)
    with Live(_view({}), console=console, refresh_per_second=2, transient=json_out) as live:
        record = run_study(root, out, opts, watch=lambda st: live.update(_view(st)))
    if json_out:
        return print_json(record)
    agg = record["aggregate"]
    cfr = agg["cfr"]
    if cfr["mean"] is not None:
        console.print(f"{agg['objects']} objects: CFR mean {100 * cfr['mean']:.3f} % "
                      f"(min {100 * cfr['min']:.3f} %, max {100 * cfr['max']:.3f} %)")
    console.print(f"study written to [bold]{escape(str(Path(out) / 'study.html'))}[/]")


def register(app: typer.Typer) -> None:
    """Add the ``study`` command to ``app``."""
    app.command("study")(study)
