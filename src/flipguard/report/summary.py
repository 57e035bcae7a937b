"""The plain-language summary and the run-configuration sections.

>>> from pathlib import Path
>>> ctx = ReportContext(Path("runs/demo"), metrics={"image_auroc": 0.9, "n_test": 10})
>>> summary_lines(ctx)[0].startswith("The detector reaches an image AUROC of 0.9")
True
"""

from __future__ import annotations

import math
from typing import Any

from flipguard.faults import get_format
from flipguard.report.content_campaign import kernel_layers
from flipguard.report.html import fmt_value
from flipguard.report.sections import (
    Column,
    Note,
    Paragraph,
    ReportContext,
    Section,
    Table,
    section,
)
from flipguard.report.text import flatten, hardening_text

__all__ = ["bit_shares", "flatten", "summary_lines"]


def _pct(v: Any) -> str:
    return f"{fmt_value(v, 'pct')} %"


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("cfr") is not None and math.isfinite(float(r["cfr"]))]


def bit_shares(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Estimated share of the critical faults per bit, ``cfr_b * N_b / sum``, largest first.

    >>> bit_shares([{"bit": 30, "cfr": 0.5, "N": 10}, {"bit": 0, "cfr": 0.1, "N": 10}])
    [(30, 0.8333333333333334), (0, 0.16666666666666666)]
    """
    crit = [(int(r["bit"]), float(r["cfr"]) * float(r["N"])) for r in _finite(rows)]
    total = sum(w for _, w in crit)
    if total <= 0:
        return []
    return sorted(((b, w / total) for b, w in crit), key=lambda t: (-t[1], -t[0]))


def _detector_line(m: dict[str, Any]) -> str | None:
    if m.get("image_auroc") is None:
        return None
    text = (f"The detector reaches an image AUROC of {fmt_value(m['image_auroc'], 'float')}"
            f" on {fmt_value(m.get('n_test'), 'int')} test images "
            f"({fmt_value(m.get('n_anomalous'), 'int')} defective)")
    if m.get("accuracy") is not None and m.get("threshold") is not None:
        text += (f"; at its calibrated threshold {fmt_value(m['threshold'], 'float')} the "
                 f"accuracy is {_pct(m['accuracy'])} and F1 {fmt_value(m.get('f1'), 'float')}")
    return text + "."


def summary_lines(ctx: ReportContext) -> list[str]:
    """Short plain-language findings (detector, campaign status, worst layer/bit/kernel)."""
    lines = [t for t in [_detector_line(ctx.metrics)] if t]
    c = ctx.campaign
    if c is None and "campaign" in ctx.withheld:
        return [*lines, "The campaign store was made for another model, dataset or task than "
                        "this run's; rerun the campaign to report its fault tolerance."]
    if c is None:
        return [*lines, "No fault-injection campaign has been run yet."]
    if c.done == 0:
        return [*lines, f"The campaign is planned ({c.planned:,} faults) but no fault has "
                        "been executed yet."]
    state = "complete" if c.complete else "INCOMPLETE, so every rate below is provisional"
    lines.append(f"The campaign executed {c.done:,} of {c.planned:,} planned faults "
                 f"({state}).")
    conf = f"{100 * c.confidence:g} %"
    net = (c.tables.get("network") or [None])[0]
    if net is not None and net.get("cfr") is not None:
        lo, hi = net["ci"]
        lines.append(f"Under the criterion {c.criterion}, the network's critical-fault rate "
                     f"is {_pct(net['cfr'])} ± {_pct(net['margin'])} ({conf} interval "
                     f"{fmt_value(lo, 'pct')}–{fmt_value(hi, 'pct')} %).")
    layers = _finite(c.tables.get("layer") or [])
    if layers and max(float(r["cfr"]) for r in layers) == 0:
        top = max(float(r["ci"][1]) for r in layers)
        lines.append(f"No critical fault has been observed in any layer so far (upper "
                     f"interval bounds up to {_pct(top)}).")
    elif layers:
        worst = max(layers, key=lambda r: float(r["cfr"]))
        best = min(layers, key=lambda r: float(r["cfr"]))
        text = (f"The most vulnerable layer is {ctx.label(worst['layer'])} with CFR "
                f"{_pct(worst['cfr'])} ± {_pct(worst['margin'])}")
        if best is not worst:
            text += f"; the least vulnerable is {ctx.label(best['layer'])} ({_pct(best['cfr'])})"
        lines.append(text + ".")
    shares = bit_shares(c.tables.get("bit") or [])
    if shares:
        form = get_format(c.fmt)
        b, w = shares[0]
        text = f"Bit {b} ({form.field(b)}) accounts for {100 * w:.1f} % of the critical faults"
        top = [t for t in shares[:3] if t[1] > 0]
        if len(top) > 1 and w < 0.995:
            text += (f"; bits {', '.join(str(t[0]) for t in top)} together for "
                     f"{100 * sum(t[1] for t in top):.1f} %")
        lines.append(text + " (estimated from the per-bit rates and populations).")
    kernels = c.tables.get("layer_kernel") or []
    for name in kernel_layers(ctx):
        mine = _finite([r for r in kernels if r["layer"] == name])
        if len(mine) > 1 and max(float(r["cfr"]) for r in mine) > 0:
            worst = max(mine, key=lambda r: float(r["cfr"]))
            lines.append(f"In {ctx.label(name)}, kernel {worst['kernel']} is the most "
                         f"vulnerable of {len(mine)} kernels (CFR {_pct(worst['cfr'])} ± "
                         f"{_pct(worst['margin'])}).")
    h = ctx.extras.get("hardening")
    if isinstance(h, dict):
        text = hardening_text(h)
        if text:
            lines.append("Hardening: " + text[0].lower() + text[1:])
    return lines


@section("Summary", order=0)
def summary(ctx: ReportContext) -> Section:
    """Plain-language findings; warns first when the campaign is partial."""
    blocks: list[Any] = [n for n in map(ctx.withheld_note, ctx.withheld) if n is not None]
    c = ctx.campaign
    if c is not None and not c.complete:
        blocks.append(Note(
            f"Partial campaign: only {c.done:,} of {c.planned:,} planned faults "
            f"({100 * c.done / max(c.planned, 1):.1f} %) have been executed. Results are "
            "provisional; see the margins achieved so far in 'Fault-injection campaign'.",
            "warning"))
    blocks += [Paragraph(t) for t in summary_lines(ctx)]
    blocks += [Note(n) for n in ctx.notes]
    return Section("Summary", blocks)


@section("Run configuration", order=10)
def configuration(ctx: ReportContext) -> Section:
    """The run's configuration (``config.json``) as a key/value table."""
    rows = [{"key": "run directory", "value": str(ctx.run_path)}]
    rows += [{"key": k, "value": fmt_value(v)} for k, v in flatten(ctx.config)]
    blocks: list[Any] = [Table("config", [Column("key", "setting"), Column("value", "value")],
                               rows, "Run configuration (config.json)")]
    if ctx.layer_types:
        blocks.append(Table(
            "layers", [Column("layer", "layer"), Column("type", "type")],
            [{"layer": n, "type": t} for n, t in ctx.layer_types.items()],
            "Layers in network order", collapsed=len(ctx.layer_types) > 12))
    return Section("Run configuration", blocks)
