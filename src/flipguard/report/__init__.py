"""The reliability report: figures, tables and ONE self-contained HTML file per run, rendered
from a plain-data :class:`ReportContext` (``flipguard.study.reports.collect`` fills one from a
run directory, ``flipguard.study.reports.build_report`` writes it).

>>> import tempfile
>>> from pathlib import Path
>>> render_report(ReportContext(Path(tempfile.mkdtemp()), metrics={"image_auroc": 0.9})).name
'report.html'

Add a section with one function (``None`` when its data is absent)::

    from flipguard.report import Paragraph, Section, section

    @section("My results", order=95)
    def mine(ctx):
        data = ctx.extras.get("mine")
        return None if data is None else Section("My results", [Paragraph(str(data))])
"""

from __future__ import annotations

from flipguard.report import (  # noqa: F401 - importing registers the built-in sections
    content_campaign,
    content_criticality,
    content_detector,
    content_extras,
    summary,
)
from flipguard.report.build import render_report, write_report
from flipguard.report.sections import (
    SECTIONS,
    CampaignData,
    Column,
    DetectorData,
    Figure,
    Note,
    Paragraph,
    ReportContext,
    Section,
    Table,
    make_sections,
    section,
)

__all__ = [
    "SECTIONS",
    "CampaignData",
    "Column",
    "DetectorData",
    "Figure",
    "Note",
    "Paragraph",
    "ReportContext",
    "Section",
    "Table",
    "make_sections",
    "render_report",
    "section",
    "write_report",
]
