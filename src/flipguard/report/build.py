"""Write the report of a plain-data :class:`ReportContext`: ``report.html`` (self-contained),
``report.md``, CSV tables in ``report/*.csv`` and figures in ``report/figures/*.png|svg``
(all atomic). Collecting a run directory's context is :mod:`flipguard.study.reports`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flipguard.errors import ConfigError
from flipguard.fileio import atomic_write
from flipguard.report.html import render_html, render_markdown
from flipguard.report.sections import Figure, ReportContext, Section, Table, make_sections

__all__ = ["ReportFiles", "render_report", "table_csv", "write_report"]

MANIFEST = ".flipguard-report.json"
"""Inside the assets folder: every file the last report wrote, with its sha256."""


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
    ``figures`` (``assets/figures``). ``out`` may be an ``.html`` file or a folder (existing,
    or a path without suffix), which then receives ``report.html`` and ``report/``.

    >>> ReportFiles("out/study").html.as_posix(), ReportFiles("r.html").assets.as_posix()
    ('out/study/report.html', 'r')
    """

    def __init__(self, out: str | Path) -> None:
        out = Path(out)
        if out.is_dir() or out.suffix == "":
            out = out / "report.html"
        elif out.suffix.lower() not in (".html", ".htm"):
            raise ConfigError(f"--out {out}: expected an .html file or a folder")
        if out.is_dir():
            raise ConfigError(f"--out {out}: a folder is in the way of the report file")
        self.html = out
        self.markdown = out.with_suffix(".md")
        self.assets = out.with_suffix("")
        self.figures = self.assets / "figures"
        for p in (self.markdown, self.assets / MANIFEST):
            if p.is_dir():
                raise ConfigError(f"{p}: a folder is in the way of a report file")
        if self.assets.exists() and not self.assets.is_dir():
            raise ConfigError(f"{self.assets}: a file is in the way of the report's folder")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _previous(files: ReportFiles) -> dict[str, str]:
    """The manifest of the last report written here ({} if none). Reports of flipguard
    0.1 left a bare marker file instead: their files may be overwritten, never deleted."""
    try:
        return dict(json.loads((files.assets / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not (files.assets / ".flipguard-report").is_file():
        return {}
    old = {p.relative_to(files.assets).as_posix(): "" for p in files.assets.rglob("*")
           if p.is_file() and p.suffix in (".csv", ".png", ".svg")}
    return {**old, "../" + files.markdown.name: ""}


def _refuse_foreign(files: ReportFiles, previous: dict[str, str], paths: Sequence[Path]
                    ) -> None:
    """Refuse, before writing anything, to overwrite a file this tool did not write."""
    if files.markdown.exists() and "../" + files.markdown.name not in previous:
        raise ConfigError(f"{files.markdown}: exists and was not written by flipguard report; "
                          f"choose another --out")
    for p in paths:
        if p.exists() and p.relative_to(files.assets).as_posix() not in previous:
            raise ConfigError(f"{p}: exists and was not written by flipguard report; "
                              f"choose another --out")


def _remove_stale(files: ReportFiles, previous: dict[str, str], written: dict[str, str]) -> None:
    """Delete what the previous report wrote and this one did not, only where the file is
    still exactly what we wrote (a file the user changed or made is never touched)."""
    for rel, digest in previous.items():
        p = files.assets / rel
        if rel in written or ".." in Path(rel).parts or not p.is_file():
            continue
        try:
            if _sha(p.read_bytes()) == digest:
                p.unlink()
        except OSError:
            pass


def _blocks(sections: Sequence[Section], kind: type) -> list[Any]:
    return [b for s in sections for b in s.blocks if isinstance(b, kind)]


def render_report(ctx: ReportContext, out: str | Path | None = None) -> Path:
    """Render every registered section of ``ctx`` and write all report files; returns the
    HTML path (default ``ctx.run_path / "report.html"``).

    >>> import tempfile
    >>> ctx = ReportContext(Path(tempfile.mkdtemp()), metrics={"image_auroc": 0.9})
    >>> render_report(ctx).name
    'report.html'
    """
    subtitle = f"Run {ctx.run_path}"
    if ctx.campaign is not None:
        subtitle += f" · criterion {ctx.campaign.criterion} · {ctx.campaign.method} intervals"
    return write_report(make_sections(ctx), out if out is not None else
                        ctx.run_path / "report.html", ctx.title, subtitle)


def write_report(sections: Sequence[Section], out: str | Path, title: str,
                 subtitle: str = "") -> Path:
    """Write ``sections`` as one self-contained HTML file (figures inlined), a Markdown file
    beside it and CSV/PNG/SVG assets in ``<out without suffix>/``; returns the HTML path.
    Never overwrites or deletes a file it did not write (see :class:`ReportFiles`)."""
    files = ReportFiles(out)
    previous = _previous(files)
    outputs: list[tuple[Path, bytes]] = [
        (files.assets / f"{t.name}.csv", table_csv(t).encode()) for t in _blocks(sections, Table)]
    for f in _blocks(sections, Figure):
        outputs += [(files.figures / f"{f.name}.png", f.png),
                    (files.figures / f"{f.name}.svg", f.svg.encode())]
    _refuse_foreign(files, previous, [p for p, _ in outputs])
    written: dict[str, str] = {}
    for p, data in outputs:
        atomic_write(p, data)
        written[p.relative_to(files.assets).as_posix()] = _sha(data)
    _remove_stale(files, previous, written)
    written["../" + files.markdown.name] = ""
    atomic_write(files.assets / MANIFEST, json.dumps({"files": written}, indent=1) + "\n")
    rel = f"{files.assets.name}/figures"
    atomic_write(files.markdown, render_markdown(sections, title, subtitle, rel))
    atomic_write(files.html, render_html(sections, title, subtitle, files.assets.name))
    return files.html

