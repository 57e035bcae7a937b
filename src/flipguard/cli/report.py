"""`flipguard report RUN`: the self-contained reliability report of a run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from flipguard.campaign.stats import DEFAULT_METHOD
from flipguard.cli._common import console, escape, print_json
from flipguard.cli.options import command, option
from flipguard.report import render_report
from flipguard.study.reports import collect


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip()) or None


@dataclass(frozen=True)
class ReportArgs:
    """What the report shows."""

    criterion: str = option("accuracy-drop:0.01", "--criterion",
                            help="accuracy-drop:δ | any-flip | auroc-drop:δ")
    method: str = option(DEFAULT_METHOD, "--method", help="clopper-pearson (exact) | wilson")
    kernel_layers: str | None = option(
        None, "--kernel-layers", help="Comma list of layers for the per-kernel figures "
        "(default: first and last).")
    bit_layers: str | None = option(
        None, "--bit-layers", help="Comma list of layers with their own per-bit panel "
        "(default: the four most vulnerable).")
    examples: int = option(6, "--examples", min=0, help="Example test images shown.")


@command
def report(run: Path = typer.Argument(..., help="Run directory."), *, args: ReportArgs,
           out: Path | None = typer.Option(None, "--out",
                                           help="HTML file to write (default RUN/report.html)."),
           json_out: bool = typer.Option(False, "--json",
                                         help="Print the written paths as JSON.")) -> None:
    """Write RUN/report.html (one self-contained file), RUN/report.md, CSV tables and
    figures (RUN/report/)."""
    ctx = collect(run, args.criterion, args.method, kernel_layers=_split(args.kernel_layers),
                  bit_layers=_split(args.bit_layers), examples=args.examples)
    html = render_report(ctx, out)
    c = ctx.campaign
    if json_out:
        return print_json({"html": str(html), "markdown": str(html.with_suffix(".md")),
                           "assets": str(html.with_suffix("")),
                           "complete": None if c is None else c.complete,
                           "withheld": ctx.withheld})
    for what, why in ctx.withheld.items():
        console.print(f"[bold yellow]{what} results withheld:[/] {escape(why)}",
                      highlight=False, soft_wrap=True)
    if c is not None and not c.complete:
        console.print(f"[bold yellow]partial campaign:[/] {c.done:,} of {c.planned:,} faults "
                      "executed", highlight=False)
    console.print(f"report written to [bold]{escape(str(html))}[/]", highlight=False,
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""
    app.command("report")(report)
