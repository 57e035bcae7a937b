"""`flipguard report RUN`: the self-contained reliability report of a run directory."""

from __future__ import annotations

from pathlib import Path

import typer

from flipguard.campaign.stats import DEFAULT_METHOD
from flipguard.cli._common import cli_errors, console, print_json


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip()) or None


def report(
    run: Path = typer.Argument(..., help="Run directory."),
    criterion: str = typer.Option("accuracy-drop:0.01", "--criterion",
                                  help="accuracy-drop:δ | any-flip | auroc-drop:δ"),
    out: Path | None = typer.Option(None, "--out",
                                    help="HTML file to write (default RUN/report.html)."),
    method: str = typer.Option(DEFAULT_METHOD, "--method", help="clopper-pearson (exact) | wilson"),
    kernel_layers: str | None = typer.Option(
        None, "--kernel-layers", help="Comma list of layers for the per-kernel figures "
        "(default: first and last)."),
    bit_layers: str | None = typer.Option(
        None, "--bit-layers", help="Comma list of layers with their own per-bit panel "
        "(default: the four most vulnerable)."),
    examples: int = typer.Option(6, "--examples", min=0, help="Example test images shown."),
    json_out: bool = typer.Option(False, "--json", help="Print the written paths as JSON."),
) -> None:
    """Write RUN/report.html (one self-contained file), RUN/report.md, CSV tables and
    figures (RUN/report/)."""
    from flipguard.report import collect, render_report

    ctx = collect(run, criterion, method, kernel_layers=_split(kernel_layers),
                  bit_layers=_split(bit_layers), examples=examples)
    html = render_report(ctx, out)
    if json_out:
        print_json({"html": str(html), "markdown": str(html.with_suffix(".md")),
                    "assets": str(html.with_suffix("")),
                    "complete": None if ctx.campaign is None else ctx.campaign.complete})
        return
    if ctx.campaign is not None and not ctx.campaign.complete:
        console.print(f"[bold yellow]partial campaign:[/] {ctx.campaign.done:,} of "
                      f"{ctx.campaign.planned:,} faults executed", highlight=False)
    console.print(f"report written to [bold]{html}[/]", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""
    app.command("report")(cli_errors(report))
