"""Report building blocks, the plain-data report context and the section registry.

A report is a list of :class:`Section` objects, each a title plus blocks (:class:`Paragraph`,
:class:`Note`, :class:`Table`, :class:`Figure`). Sections are produced by small functions
registered with :func:`section`; a function returns ``None`` when its data is absent, so a
new report section is one function::

    @section("Hardening", order=80)
    def hardening(ctx: ReportContext) -> Section | None:
        data = ctx.extras.get("hardening")
        if data is None:
            return None
        return Section("Hardening", [Paragraph(f"overhead {data['overhead']:.1%}")])

The context holds plain data only (row dicts, arrays), filled by
:func:`flipguard.study.reports.collect` from a run directory or by hand in tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CampaignData",
    "Column",
    "DetectorData",
    "Figure",
    "Note",
    "Paragraph",
    "ReportContext",
    "SECTIONS",
    "Section",
    "Table",
    "make_sections",
    "section",
    "slug",
]


# ---- blocks --------------------------------------------------------------------------------
@dataclass
class Paragraph:
    """Plain text (escaped when rendered)."""

    text: str


@dataclass
class Note:
    """A highlighted message; ``level`` is "info" or "warning" (shown prominently)."""

    text: str
    level: str = "info"


@dataclass(frozen=True)
class Column:
    """A table column: row key, header label and kind ("text", "int", "pct", "float")."""

    key: str
    label: str
    kind: str = "text"


@dataclass
class Table:
    """Rows of plain values; also written to ``report/<name>.csv`` (all rows, full precision).

    ``limit``: at most this many rows in the HTML/Markdown (the CSV keeps every row).
    """

    name: str
    columns: Sequence[Column]
    rows: list[dict[str, Any]]
    caption: str = ""
    limit: int | None = None
    collapsed: bool = False


@dataclass
class Figure:
    """A rendered figure: PNG bytes (embedded in the HTML) and SVG text (written to disk)."""

    name: str
    caption: str
    png: bytes
    svg: str


Block = Paragraph | Note | Table | Figure


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def anchor(self) -> str:
        return slug(self.title)


def slug(text: str) -> str:
    """HTML-id / file-name safe form of ``text``: ``slug("CFR per bit") == "cfr-per-bit"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


# ---- plain data -----------------------------------------------------------------------------
@dataclass
class DetectorData:
    """Test-set scores and a few example images of the detector (numpy arrays).

    ``images``/``maps``/``masks``: (k, H, W) or (k, H, W, 3) examples (``masks`` may be None);
    ``titles``: one caption per example; ``types``: defect type of every test image.
    """

    scores: np.ndarray
    labels: np.ndarray
    threshold: float
    types: list[str] = field(default_factory=list)
    images: np.ndarray | None = None
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    titles: list[str] = field(default_factory=list)


@dataclass
class CampaignData:
    """Campaign facts as plain rows.

    ``tables``: CFR rows of ``flipguard.campaign.analysis.cfr_table`` keyed by grouping:
    "network", "layer", "bit", "field", "layer_bit", "layer_kernel" (any may be missing).
    ``strata``: per plan stratum ``key, layer, target, N, planned, done, critical, cfr,
    ci_low, ci_high, margin`` (the margin achieved so far).
    """

    criterion: str
    method: str
    confidence: float
    fmt: str
    plan: dict[str, Any]
    population: int
    planned: int
    done: int
    strata: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rounds: int = 0

    @property
    def complete(self) -> bool:
        return self.planned > 0 and self.done >= self.planned

    @property
    def target_error(self) -> float | None:
        e = self.plan.get("error")
        return None if e is None else float(e)


@dataclass
class ReportContext:
    """Everything a section may show. ``layer_types`` maps layer names to module types in
    network order; ``kernel_layers``: layers of the per-kernel figures (default: first and
    last layer with campaign data); ``bit_layers``: layers with their own per-bit panel
    (default: the four most vulnerable); ``extras``: results of later stages ("hardening",
    "resiliency") as loaded from ``RUN/<name>.json``, and "calibration" (predicted vs
    observed criticality, :func:`flipguard.study.reports.calibration_data`); ``withheld``:
    results left out because they do not describe the run as it is now ("campaign",
    "hardening", "resiliency" -> why), shown as warnings in their sections."""

    run_path: Path
    title: str = "flipguard reliability report"
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    layer_types: dict[str, str] = field(default_factory=dict)
    detector: DetectorData | None = None
    campaign: CampaignData | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    withheld: dict[str, str] = field(default_factory=dict)
    kernel_layers: tuple[str, ...] | None = None
    bit_layers: tuple[str, ...] | None = None

    def label(self, layer: str) -> str:
        """``"encoder.0 (Conv2d)"`` (the bare name when the type is unknown)."""
        kind = self.layer_types.get(layer)
        return f"{layer} ({kind})" if kind else str(layer)

    def withheld_note(self, what: str) -> Note | None:
        """The warning of a withheld result (None when ``what`` is shown)."""
        why = self.withheld.get(what)
        return None if why is None else Note(f"The {what} results are not shown: {why}.",
                                             "warning")

    def layer_order(self, layers: Sequence[str]) -> list[str]:
        """``layers`` sorted in network order (unknown layers last, stable)."""
        pos = {name: i for i, name in enumerate(self.layer_types)}
        return sorted(dict.fromkeys(layers), key=lambda n: pos.get(n, len(pos)))


# ---- registry -------------------------------------------------------------------------------
SectionFn = Callable[[ReportContext], "Section | list[Section] | None"]


@dataclass(frozen=True)
class _Entry:
    title: str
    order: float
    fn: SectionFn


SECTIONS: dict[str, _Entry] = {}
"""Registered section functions by title (rendered in ``order``)."""


def section(title: str, order: float = 100.0) -> Callable[[SectionFn], SectionFn]:
    """Register ``fn(ctx) -> Section | list[Section] | None`` as a report section.

    >>> @section("Notes", order=99)
    ... def notes(ctx):
    ...     return Section("Notes", [Paragraph(n) for n in ctx.notes]) if ctx.notes else None
    """

    def deco(fn: SectionFn) -> SectionFn:
        SECTIONS[title] = _Entry(title, float(order), fn)
        return fn

    return deco


def make_sections(ctx: ReportContext) -> list[Section]:
    """Call every registered section function in order; drops the ``None`` results."""
    out: list[Section] = []
    for entry in sorted(SECTIONS.values(), key=lambda e: (e.order, e.title)):
        res = entry.fn(ctx)
        if res is None:
            continue
        out.extend(res if isinstance(res, list) else [res])
    return out
