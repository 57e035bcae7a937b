"""The reliability report: figures, tables and ONE self-contained HTML file per run.

>>> from flipguard.report import build_report
>>> build_report("runs/demo", criterion="accuracy-drop:0.01")   # doctest: +SKIP
PosixPath('runs/demo/report.html')

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
from flipguard.report.adapter import collect
from flipguard.report.build import build_report, render_report
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
    "build_report",
    "collect",
    "make_sections",
    "render_report",
    "section",
]
