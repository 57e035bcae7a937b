"""Render sections as ONE self-contained HTML page (inline CSS, base64 PNG figures, no scripts,
no external links) and as Markdown. Every user string is HTML-escaped.

Tables carry the exact values too: each ``<th>`` has ``data-key`` (the row key) and each
numeric ``<td>`` a ``data-value`` with the full-precision number, so the page can be checked
against the analysis API.

>>> from flipguard.report.sections import Section, Paragraph
>>> page = render_html([Section("Summary", [Paragraph("a < b")])], title="t")
>>> "a &lt; b" in page and "<script" not in page
True
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np

from flipguard import __version__
from flipguard.report.sections import Figure, Note, Paragraph, Section, Table

__all__ = ["CSS", "fmt_value", "render_html", "render_markdown"]

CSS = """
:root{--fg:#1f2933;--muted:#52606d;--line:#d9e2ec;--accent:#2e86c1;--bg:#ffffff}
*{box-sizing:border-box}
body{margin:0;background:#f5f7fa;color:var(--fg);
 font:15px/1.5 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
header{background:#1f3a5f;color:#fff;padding:22px 32px}
header h1{margin:0 0 4px;font-size:26px}
header p{margin:0;color:#d6e4f0;font-size:13px;word-break:break-all}
.wrap{max-width:1120px;margin:0 auto;padding:0 24px 40px}
nav.toc{background:var(--bg);border:1px solid var(--line);border-radius:6px;
 padding:10px 18px;margin:20px 0}
nav.toc ol{margin:4px 0;padding-left:22px;columns:2}
nav.toc a{color:var(--accent);text-decoration:none}
section{background:var(--bg);border:1px solid var(--line);border-radius:6px;
 padding:6px 24px 18px;margin:18px 0}
h2{border-bottom:2px solid var(--accent);padding-bottom:4px;font-size:21px}
p{margin:8px 0}
.note{border-left:5px solid var(--accent);background:#eaf4fb;padding:10px 14px;margin:12px 0;
 border-radius:4px}
.note.warning{border-color:#d35400;background:#fdf0e6;font-weight:600;font-size:16px}
figure{margin:16px 0}
figure img{max-width:100%;height:auto;display:block;border:1px solid var(--line)}
figcaption{color:var(--muted);font-size:13px;margin:6px 0}
.scroll{overflow-x:auto;max-width:100%;display:inline-block;vertical-align:top}
.scroll.long{max-height:540px;overflow-y:auto}
table{border-collapse:collapse;font-size:13px;min-width:40%}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;white-space:nowrap}
th{background:#f0f4f8;position:sticky;top:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
details summary{cursor:pointer;color:var(--accent);margin:6px 0}
footer{color:var(--muted);font-size:12px;text-align:center;padding:12px}
"""

NUMERIC = ("int", "pct", "float")
LONG_TABLE = 25


def fmt_value(v: Any, kind: str = "text") -> str:
    """Display text of a cell: ``pct`` = fraction shown in percent (4 significant digits),
    ``float`` 4 significant digits, ``int`` with thousands separators; None/NaN -> "—".

    >>> fmt_value(0.0125, "pct"), fmt_value(12345, "int"), fmt_value(None, "float")
    ('1.25', '12,345', '—')
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if kind in NUMERIC and not _is_num(v):
        kind = "text"
    if kind == "pct":
        return _g(100 * float(v))
    if kind == "float":
        return _g(float(v))
    if kind == "int":
        return f"{int(v):,}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _g(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _g(x: float) -> str:
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    if x == 0:
        return "0"
    return f"{x:.4g}" if 1e-4 <= abs(x) < 1e6 else f"{x:.3e}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _raw(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if kind in NUMERIC and not _is_num(v):
        kind = "text"
    if kind == "int":
        return str(int(v))
    if kind in NUMERIC:
        return repr(float(v))
    return str(v)


def _table_html(t: Table, number: int, assets: str = "report") -> str:
    cols = list(t.columns)
    rows = t.rows if t.limit is None else t.rows[: t.limit]
    head = "".join(
        f'<th data-key="{escape(c.key)}"{_cls(c.kind)}>{escape(c.label)}</th>' for c in cols)
    body = []
    for r in rows:
        cells = "".join(
            f'<td data-value="{escape(_raw(r.get(c.key), c.kind))}"{_cls(c.kind)}>'
            f"{escape(fmt_value(r.get(c.key), c.kind))}</td>" for c in cols)
        body.append(f"<tr>{cells}</tr>")
    caption = f"Table {number}" + (f" — {t.caption}" if t.caption else "")
    more = ""
    if len(rows) < len(t.rows):
        more = (f"<p class=\"more\">Showing {len(rows):,} of {len(t.rows):,} rows; all rows "
                f"are in <code>{escape(assets)}/{escape(t.name)}.csv</code>.</p>")
    long = " long" if len(rows) > LONG_TABLE else ""
    table = (f'<div class="scroll{long}"><table id="tbl-{escape(t.name)}" '
             f'data-name="{escape(t.name)}"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>{more}')
    if t.collapsed:
        table = (f"<details><summary>Show table ({len(t.rows):,} rows)</summary>{table}"
                 "</details>")
    return f'<figure class="table"><figcaption>{escape(caption)}</figcaption>{table}</figure>'


def _cls(kind: str) -> str:
    return ' class="num"' if kind in NUMERIC else ""


def _figure_html(f: Figure, number: int) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    caption = f"Figure {number} — {f.caption}"
    return (f'<figure id="fig-{escape(f.name)}"><img alt="{escape(f.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{escape(caption)}</figcaption>'
            "</figure>")


def render_html(sections: Sequence[Section], title: str = "flipguard reliability report",
                subtitle: str = "", assets: str = "report") -> str:
    """The whole report as one HTML string (figures and tables numbered in order);
    ``assets`` names the folder of the CSV files in notes about truncated tables."""
    n_fig = n_tab = 0
    parts = []
    for s in sections:
        blocks = [f'<section id="{escape(s.anchor)}"><h2>{escape(s.title)}</h2>']
        for b in s.blocks:
            if isinstance(b, Paragraph):
                blocks.append(f"<p>{escape(b.text)}</p>")
            elif isinstance(b, Note):
                level = "warning" if b.level == "warning" else "info"
                blocks.append(f'<div class="note {level}">{escape(b.text)}</div>')
            elif isinstance(b, Table):
                n_tab += 1
                blocks.append(_table_html(b, n_tab, assets))
            elif isinstance(b, Figure):
                n_fig += 1
                blocks.append(_figure_html(b, n_fig))
        blocks.append("</section>")
        parts.append("\n".join(blocks))
    toc = "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>'
                  for s in sections)
    sub = f"<p>{escape(subtitle)}</p>" if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>"
        f"<header><h1>{escape(title)}</h1>{sub}</header>\n<div class=\"wrap\">"
        f"<nav class=\"toc\"><strong>Contents</strong><ol>{toc}</ol></nav>\n"
        + "\n".join(parts)
        + f"\n<footer>Generated by flipguard {escape(__version__)}. This file is "
        "self-contained: it loads nothing from disk or network.</footer></div></body></html>\n"
    )


def _md(text: str) -> str:
    """Markdown-safe text: HTML special characters escaped (Markdown passes raw HTML)."""
    return escape(str(text), quote=False)


def _md_cell(text: str) -> str:
    return _md(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: Sequence[Section], title: str = "flipguard reliability report",
                    subtitle: str = "", figure_dir: str = "report/figures") -> str:
    """The report as Markdown; figures link to ``figure_dir/<name>.png``."""
    out = [f"# {_md(title)}", ""]
    if subtitle:
        out += [_md(subtitle), ""]
    n_fig = n_tab = 0
    for s in sections:
        out += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            if isinstance(b, Paragraph):
                out += [_md(b.text), ""]
            elif isinstance(b, Note):
                kind = "Warning" if b.level == "warning" else "Note"
                out += [f"> **{kind}:** {_md(b.text)}", ""]
            elif isinstance(b, Figure):
                n_fig += 1
                cap = _md(b.caption)
                out += [f"![Figure {n_fig} — {cap}]({figure_dir}/{b.name}.png)", "",
                        f"*Figure {n_fig} — {cap}*", ""]
            elif isinstance(b, Table):
                n_tab += 1
                rows = b.rows if b.limit is None else b.rows[: b.limit]
                out += [f"*Table {n_tab}" + (f" — {_md(b.caption)}*" if b.caption else "*"), ""]
                out.append("| " + " | ".join(_md_cell(c.label) for c in b.columns) + " |")
                out.append("|" + "|".join("---:" if c.kind in NUMERIC else "---"
                                          for c in b.columns) + "|")
                for r in rows:
                    out.append("| " + " | ".join(_md_cell(fmt_value(r.get(c.key), c.kind))
                                                 for c in b.columns) + " |")
                if len(rows) < len(b.rows):
                    out.append(f"\n{len(rows)} of {len(b.rows)} rows shown; see "
                               f"`{figure_dir.rsplit('/', 1)[0]}/{b.name}.csv`.")
                out.append("")
    return "\n".join(out) + "\n"
