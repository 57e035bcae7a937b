"""`flipguard validate RUN --layer L`: SFI against exhaustive injection of one layer."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flipguard.cli._common import cli_errors, console, escape, print_json
from flipguard.cli._core import make_progress
from flipguard.errors import ConfigError
from flipguard.study.engines import RunEngineFactory
from flipguard.study.validate import ValidateOptions, validate_run


def _floats(text: str, name: str) -> tuple[float, ...]:

    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{name}: expected at least one value")
    return vals


def validate(
    run: Path = typer.Argument(..., help="Run directory."),
    layer: str = typer.Option(..., "--layer", help="Layer whose population is enumerated."),
    bits: str | None = typer.Option(None, "--bits", help="Comma list of bits (default all)."),
    images: int | None = typer.Option(None, "--images", min=1,
                                      help="Evenly spaced test images (default all)."),
    margins: str = typer.Option("0.01,0.02,0.05", "--margins", help="SFI margins e."),
    confidence: float = typer.Option(0.95, "--confidence"),
    replications: int = typer.Option(2000, "--replications", min=1,
                                     help="SFI samples drawn per design and margin."),
    criterion: str = typer.Option("accuracy-drop:0.01", "--criterion"),
    workers: int = typer.Option(1, "--workers", min=1, help="Local worker processes."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = typer.Option(False, "--json", help="Print the record as JSON."),
) -> None:
    """Inject every fault of LAYER once (RUN/validate/LAYER.sqlite, resumable), then compare
    SFI estimates and intervals at each margin with the exhaustive CFR."""

    opts = ValidateOptions(
        layer=layer, images=images, margins=_floats(margins, "--margins"),
        bits=None if bits is None else tuple(int(b) for b in _floats(bits, "--bits")),
        confidence=confidence, replications=replications, criterion=criterion,
        workers=workers, seed=seed)
    factory = RunEngineFactory(str(run), images=images)
    with make_progress() as bar:
        task = bar.add_task("exhaustive", total=None, info="")
        rec = validate_run(run, factory, opts,
                           progress=lambda d, t: bar.update(task, completed=d, total=t))
    if json_out:
        print_json(rec)
        return
    console.print(f"{escape(layer)}: exhaustive CFR [bold]{100 * rec['cfr']:.3f} %[/] "
                  f"({rec['critical']:,} of {rec['population']:,} faults, {rec['criterion']})",
                  highlight=False)
    table = Table(title=f"SFI vs exhaustive ({rec['replications']:,} samples per row, "
                        f"nominal {100 * confidence:g} %)")
    for col in ("design", "e", "n", "SFI estimate", "interval", "coverage"):
        table.add_column(col, justify="right")
    for r in rec["rows"]:
        if r["scope"] == "bit":
            continue
        table.add_row(r["scope"], f"{r['margin']:g}", f"{r['n']:,}",
                      f"{100 * r['estimate']:.3f} %",
                      f"[{100 * r['ci'][0]:.3f}, {100 * r['ci'][1]:.3f}] %",
                      f"{100 * r['coverage']:.1f} ± {196 * r['coverage_se']:.1f} %")
    console.print(table)
    console.print(f"figure: [bold]{escape(rec['figure'])}[/]")


def register(app: typer.Typer) -> None:
    """Add the ``validate`` command to ``app``."""
    app.command("validate")(cli_errors(validate))
