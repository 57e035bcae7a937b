"""The study page (``DIR/study.html``): one row per object with its detector and reliability
figures, then the CFR per layer, per bit and per kernel (first and last layer) across the
objects. Plain data in (the ``study.json`` record and per-object CFR rows), sections out.

>>> rec = {"criterion": "any-flip", "categories": [
...     {"name": "a", "metrics": {"image_auroc": 0.9}, "network": {"cfr": 0.1, "ci": [0, 0.2]}}]}
>>> [s.title for s in study_sections(rec, {})]
['Objects']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flipguard.report.build import write_report
from flipguard.report.figures import render
from flipguard.report.figures_study import (
    study_bit_figure,
    study_kernel_figure,
    study_layer_figure,
)
from flipguard.report.sections import Column, Note, Paragraph, Section, Table

__all__ = ["render_study", "study_sections"]

Rows = Sequence[dict[str, Any]]
OBJECT_COLUMNS = (
    Column("name", "object"), Column("image_auroc", "image AUROC", "float"),
    Column("pixel_auroc", "pixel AUROC", "float"), Column("aupro", "AUPRO", "float"),
    Column("f1", "F1 (deployed)", "float"), Column("oracle_f1", "F1 (oracle)", "float"),
    Column("accuracy", "accuracy", "float"), Column("cfr", "CFR", "pct"),
    Column("ci", "CFR interval"), Column("faults", "faults", "int"),
    Column("improvement", "hardening gain", "pct"), Column("overhead", "overhead", "pct"),
    Column("status", "status"))


def _object_row(c: dict[str, Any]) -> dict[str, Any]:
    m, net, h = c.get("metrics") or {}, c.get("network") or {}, c.get("hardening") or {}
    ci = net.get("ci")
    return {"name": c["name"], **{k: m.get(k) for k in
                                  ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy")},
            "oracle_f1": m.get("oracle_f1"), "cfr": net.get("cfr"),
            "ci": None if ci is None else f"[{100 * ci[0]:.3f}, {100 * ci[1]:.3f}] %",
            "faults": net.get("n"), "improvement": h.get("relative_improvement"),
            "overhead": h.get("overhead"), "status": c.get("status", "")}


def study_sections(record: dict[str, Any], tables: Mapping[str, Mapping[str, Rows]]
                   ) -> list[Section]:
    """Sections of the study page. ``tables[grouping][object]`` holds the object's CFR rows
    for ``grouping`` in ``layer``, ``bit``, ``layer_kernel``."""
    crit = record.get("criterion", "")
    cats = record.get("categories", [])
    blocks: list[Any] = [Paragraph(
        f"{len(cats)} objects, criterion {crit}. Each object has its own run directory with "
        f"its full report; the figures below put the objects side by side.")]
    failed = [c["name"] for c in cats if c.get("status") == "failed"]
    if failed:
        blocks.append(Note(f"Stages failed for: {', '.join(failed)} (see study.json).",
                           "warning"))
    blocks.append(Table("objects", OBJECT_COLUMNS, [_object_row(c) for c in cats]))
    out = [Section("Objects", blocks)]
    layer, bit = tables.get("layer", {}), tables.get("bit", {})
    if layer:
        out.append(Section("CFR per layer across objects", [render(
            study_layer_figure(layer, crit), "study_layer",
            "Mean CFR over the objects (bar) with the min–max spread; each marker one object.")]))
    if bit:
        out.append(Section("CFR per bit across objects", [render(
            study_bit_figure(bit, record.get("fmt", "fp32"), crit), "study_bit",
            "Mean CFR per bit position over the objects, coloured by field.")]))
    kern = tables.get("layer_kernel", {})
    for name in record.get("kernel_layers", []):
        if any(r.get("layer") == name for rows in kern.values() for r in rows):
            out.append(Section(f"CFR per kernel of {name} across objects", [render(
                study_kernel_figure(kern, name), f"study_kernel_{name.replace('.', '_')}",
                f"CFR of each kernel (output-channel filter) of {name}, one row per object; "
                f"grey: no executed fault.")]))
    return out


def render_study(record: dict[str, Any], tables: Mapping[str, Mapping[str, Rows]],
                 out: str | Path) -> Path:
    """Write ``out`` (``DIR/study.html``), self-contained, with its Markdown and assets."""
    return write_report(study_sections(record, tables), out, "flipguard study",
                        f"{record.get('root', '')} · criterion {record.get('criterion', '')}")
