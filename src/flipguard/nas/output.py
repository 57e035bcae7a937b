"""Outputs of a search: ``OUT/nas.json`` (schema ``flipguard.nas/1``), the front table
(``front.csv`` / ``front.md``), the figure ``front.png`` (quality vs RA, memory as colour,
one panel per exposure model, the baseline on the same axes) and ``report.html``.

>>> rows = front_rows({"final": [], "baseline": None, "final_front": []}, ["uniform"])
>>> rows
[]
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from flipguard.fileio import atomic_write, json_clean
from flipguard.nas.front_view import front_figure, front_rows
from flipguard.nas.report_section import nas_section
from flipguard.report.build import write_report

__all__ = ["SCHEMA", "front_figure", "front_rows", "markdown_table", "write_outputs"]

SCHEMA = "flipguard.nas/1"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:.4f}, {v[1]:.4f}]"
    return "" if v is None else str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a Markdown table (columns of the first row)."""
    if not rows:
        return "(no retrained networks)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    cols = list(dict.fromkeys(k for r in rows for k in r))
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def write_outputs(doc: dict[str, Any], out: Path, hardware: list[str]) -> dict[str, str]:
    """Write nas.json, front.csv, front.md, front.png and report.html; returns their paths."""
    import matplotlib.pyplot as plt

    rows = front_rows(doc, hardware)
    files = {"json": out / "nas.json", "csv": out / "front.csv", "markdown": out / "front.md",
             "figure": out / "front.png", "report": out / "report.html"}
    doc = {**doc, "files": {k: str(v) for k, v in files.items()}}
    atomic_write(files["csv"], _csv(rows) if rows else "")
    atomic_write(files["markdown"], markdown_table(rows))
    fig = front_figure(doc, hardware)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(files["figure"], buf.getvalue())
    try:

        write_report([nas_section(doc)], files["report"], "flipguard architecture search",
                     f"Search {out}")
    except ImportError:  # pragma: no cover - report package unavailable
        files.pop("report")
    atomic_write(files["json"], json.dumps(json_clean({"schema": SCHEMA, **doc}), indent=2,
                                           default=str) + "\n")
    return {k: str(v) for k, v in files.items()}
