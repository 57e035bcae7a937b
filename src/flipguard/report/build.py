"""Write the report: ``RUN/report.html`` (self-contained), ``RUN/report.md``, CSV tables in
``RUN/report/*.csv`` and figures in ``RUN/report/figures/*.png|svg`` (all atomic).

>>> build_report("runs/demo")                     # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flipguard.fileio import atomic_write
from flipguard.report.html import render_html, render_markdown
from flipguard.report.sections import Figure, ReportContext, Section, Table, make_sections

__all__ = ["ReportFiles", "build_report", "render_report", "table_csv"]

ASSET_SUFFIXES = (".csv", ".png", ".svg")
MARKER = ".flipguard-report"


def table_csv(t: Table) -> str:
    """All rows of ``t`` as CSV over the union of their keys (full precision; lists joined
    with ``;``)."""
    keys = list(dict.fromkeys([c.key for c in t.columns] + [k for r in t.rows for k in r]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="", lineterminator="\n")
    w.writeheader()
    for r in t.rows:
        w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else
                        "" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


class ReportFiles:
    """Paths of one report: ``html``, ``markdown``, ``assets`` (= html path without suffix),
    ``figures`` (``assets/figures``)."""

    def __init__(self, html: Path) -> None:
        self.html = html
        self.markdown = html.with_suffix(".md")
        self.assets = html.with_suffix("")
        self.figures = self.assets / "figures"


def _blocks(sections: Sequence[Section], kind: type) -> list[Any]:
    return [b for s in sections for b in s.blocks if isinstance(b, kind)]


def render_report(ctx: ReportContext, out: str | Path | None = None) -> Path:
    """Render every registered section of ``ctx`` and write all report files; returns the
    HTML path (default ``ctx.run_path / "report.html"``).

    >>> ctx = ReportContext(Path("runs/x"), metrics={"image_auroc": 0.9})
    >>> render_report(ctx).name                                    # doctest: +SKIP
    'report.html'
    """
    files = ReportFiles(Path(out) if out is not None else ctx.run_path / "report.html")
    sections = make_sections(ctx)
    subtitle = f"Run {ctx.run_path}"
    if ctx.campaign is not None:
        subtitle += f" · criterion {ctx.campaign.criterion} · {ctx.campaign.method} intervals"
    written: set[Path] = set()
    for t in _blocks(sections, Table):
        p = files.assets / f"{t.name}.csv"
        atomic_write(p, table_csv(t))
        written.add(p)
    for f in _blocks(sections, Figure):
        for p, data in ((files.figures / f"{f.name}.png", f.png),
                        (files.figures / f"{f.name}.svg", f.svg.encode())):
            atomic_write(p, data)
            written.add(p)
    marker = files.assets / MARKER
    for folder in (files.assets, files.figures) if marker.is_file() else ():
        for p in folder.iterdir():  # stale assets of an earlier report of ours
            if p.is_file() and p.suffix in ASSET_SUFFIXES and p not in written:
                p.unlink()
    atomic_write(marker, "written by flipguard report; stale files here are removed\n")
    rel = f"{files.assets.name}/figures"
    atomic_write(files.markdown, render_markdown(sections, ctx.title, subtitle, rel))
    atomic_write(files.html, render_html(sections, ctx.title, subtitle, files.assets.name))
    return files.html


def build_report(run_dir: str | Path, criterion: str = "accuracy-drop:0.01",
                 out: str | Path | None = None, *, method: str = "wilson",
                 kernel_layers: Sequence[str] | None = None,
                 bit_layers: Sequence[str] | None = None, examples: int = 6) -> Path:
    """Build the reliability report of a run directory; returns the HTML path.

    ``out`` defaults to ``RUN/report.html``; the Markdown goes beside it and the CSV/figure
    files to ``<out without suffix>/``. ``kernel_layers``/``bit_layers`` choose the layers of
    the per-kernel figures and of the per-layer bit panels. A partial campaign is flagged;
    a run without a campaign gets the detector sections and a note.

    >>> build_report("runs/demo", criterion="any-flip").name   # doctest: +SKIP
    'report.html'
    """
    from flipguard.report.adapter import collect

    ctx = collect(run_dir, criterion, method, kernel_layers=kernel_layers,
                  bit_layers=bit_layers, examples=examples)
    return render_report(ctx, out)
