"""Campaign sections: plan vs executed and margins, CFR per layer / bit / kernel, layer x bit.

Each function is registered with :func:`~flipguard.report.sections.section` and returns
``None`` when its data is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flipguard.faults import get_format
from flipguard.report.figures import render
from flipguard.report.figures_cfr import (
    cfr_bit_figure,
    cfr_bit_per_layer_figure,
    cfr_kernel_figure,
    cfr_layer_figure,
    heatmap_figure,
)
from flipguard.report.html import fmt_value
from flipguard.report.sections import (
    Column,
    Note,
    Paragraph,
    ReportContext,
    Section,
    Table,
    section,
    slug,
)

__all__ = ["bit_layers", "cfr_columns", "flat_rows", "kernel_layers"]

CLASS_COLUMNS = (Column("masked", "masked (%)", "pct"),
                 Column("sdc_benign", "SDC benign (%)", "pct"),
                 Column("sdc_critical", "SDC critical (%)", "pct"),
                 Column("non_finite", "non-finite (%)", "pct"))
KEY_KINDS = {"bit": "int", "kernel": "int"}
BIT_LAYERS_DEFAULT = 4


def cfr_columns(keys: Sequence[str], classes: bool = False) -> list[Column]:
    """Columns of a CFR table grouped by ``keys`` (plus the outcome-class rates)."""
    cols = [Column(k, k, KEY_KINDS.get(k, "text")) for k in keys]
    if "layer" in keys:
        cols.insert(keys.index("layer") + 1, Column("type", "type"))
    cols += [Column("n", "executed n", "int"), Column("critical", "critical", "int"),
             Column("cfr", "CFR (%)", "pct"), Column("ci_low", "CI low (%)", "pct"),
             Column("ci_high", "CI high (%)", "pct"), Column("margin", "± margin (%)", "pct"),
             Column("N", "population N", "int")]
    return cols + list(CLASS_COLUMNS) if classes else cols


def flat_rows(ctx: ReportContext, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of analysis rows with ``ci`` split into ``ci_low``/``ci_high`` and the layer
    ``type`` added."""
    out = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "ci"}
        ci = r.get("ci") or [None, None]
        d["ci_low"], d["ci_high"] = ci[0], ci[1]
        if "layer" in r:
            d["type"] = ctx.layer_types.get(r["layer"], "")
        out.append(d)
    return out


def _ordered(ctx: ReportContext, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(ctx.layer_order([r["layer"] for r in rows]))}
    return sorted(rows, key=lambda r: order[r["layer"]])


def _crit(ctx: ReportContext) -> str:
    c = ctx.campaign
    return "" if c is None else c.criterion


@section("Fault-injection campaign", order=30)
def campaign(ctx: ReportContext) -> Section:
    """Plan vs executed counts, margins achieved, per-stratum progress."""
    c = ctx.campaign
    withheld = ctx.withheld_note("campaign")
    if withheld is not None:
        return Section("Fault-injection campaign", [withheld])
    if c is None:
        return Section("Fault-injection campaign", [Note(
            "No fault-injection campaign has been run for this run directory yet (no "
            "campaign.sqlite). Only the detector is reported; run `flipguard campaign run "
            "RUN` and rebuild the report.")])
    blocks: list[Any] = []
    share = c.done / c.planned if c.planned else 0.0
    if not c.complete:
        blocks.append(Note(
            f"Campaign incomplete: {c.done:,} of {c.planned:,} planned faults executed "
            f"({100 * share:.1f} %). All rates and margins are provisional; the margins "
            "below are those achieved so far.", "warning"))
    plan = c.plan
    e = c.target_error
    facts = [("criterion", c.criterion), ("interval method", c.method),
             ("confidence", f"{100 * c.confidence:g} %"), ("strata", plan.get("strata")),
             ("fault model", plan.get("fault_model")), ("targets", plan.get("targets")),
             ("number format", c.fmt),
             ("target margin e", None if e is None else f"±{fmt_value(e, 'pct')} %"),
             ("prior p", plan.get("p")), ("sampling seed", plan.get("seed")),
             ("population (faults)", fmt_value(c.population, "int")),
             ("planned faults", fmt_value(c.planned, "int")),
             ("executed faults", fmt_value(c.done, "int")),
             ("executed share", f"{fmt_value(share, 'pct')} %"),
             ("refinement rounds", c.rounds)]
    rows = [{"item": k, "value": fmt_value(v)} for k, v in facts]
    blocks.append(Table("campaign_plan", [Column("item", "item"), Column("value", "value")],
                        rows, "Campaign plan and progress"))
    net = (c.tables.get("network") or [None])[0]
    if net is not None:
        text = (f"Network CFR margin achieved{'' if c.complete else ' so far'}: "
                f"±{fmt_value(net['margin'], 'pct')} % at {100 * c.confidence:g} % confidence")
        if e is not None:
            text += f" (target ±{fmt_value(e, 'pct')} % per stratum)"
        if not c.complete:
            text += (". Strata without executed faults are left out of the network "
                     "estimate until they are sampled")
        blocks.append(Paragraph(text + "."))
    if c.strata:
        srows = [{**s, "met": _met(s, e)} for s in c.strata]
        cols = [Column("key", "stratum"), Column("N", "N", "int"),
                Column("planned", "planned", "int"), Column("done", "executed", "int"),
                Column("critical", "critical", "int"), Column("cfr", "CFR (%)", "pct"),
                Column("ci_low", "CI low (%)", "pct"), Column("ci_high", "CI high (%)", "pct"),
                Column("margin", "margin ± (%)", "pct"), Column("met", "target met")]
        blocks.append(Table(
            "campaign_strata", cols, srows,
            "Planned vs executed faults and margin achieved per stratum. The margin t·√var "
            "is 0 while no critical fault was seen, so 'target met' also requires the "
            "interval to lie within ±e of the estimate", limit=300,
            collapsed=len(srows) > 40))
    return Section("Fault-injection campaign", blocks)


def _met(s: dict[str, Any], e: float | None) -> bool | None:
    """Margin and interval half-widths within the target ``e`` (None when unknown)."""
    vals = [s.get("margin"), s.get("cfr"), s.get("ci_low"), s.get("ci_high")]
    if e is None or any(v is None or v != v for v in vals):
        return None
    return bool(max(s["margin"], s["cfr"] - s["ci_low"], s["ci_high"] - s["cfr"]) <= e)


@section("CFR per layer", order=40)
def cfr_layer(ctx: ReportContext) -> Section | None:
    """Fig. 1: CFR per layer in network order with CIs."""
    rows = (ctx.campaign.tables.get("layer") if ctx.campaign else None) or []
    if not rows:
        return None
    rows = _ordered(ctx, rows)
    fig = render(cfr_layer_figure(rows, ctx.label, _crit(ctx)), "cfr_layer",
                 f"CFR per layer (network order) under {_crit(ctx)}, with "
                 f"{100 * ctx.campaign.confidence:g} % {ctx.campaign.method} intervals.")
    return Section("CFR per layer", [fig, Table(
        "cfr_layer", cfr_columns(["layer"], classes=True), flat_rows(ctx, rows),
        "CFR and outcome classes per layer")])


@section("CFR per bit position", order=50)
def cfr_bit(ctx: ReportContext) -> Section | None:
    """Fig. 2: CFR per bit position (whole network, and per layer when available)."""
    c = ctx.campaign
    rows = (c.tables.get("bit") if c else None) or []
    if not rows:
        return None
    blocks: list[Any] = [render(
        cfr_bit_figure(rows, c.fmt, "CFR per bit position (whole network)", c.criterion),
        "cfr_bit", "CFR per bit position for the whole network; colour = field "
        "(sign / exponent / mantissa), whiskers = confidence interval.")]
    blocks.append(Table("cfr_bit", cfr_columns(["bit", "field"]), _with_field(rows, c.fmt),
                        "CFR per bit position (whole network)", collapsed=True))
    fields = c.tables.get("field") or []
    if fields:
        blocks.append(Table("cfr_field", cfr_columns(["field"]), flat_rows(ctx, fields),
                            "CFR per bit field (whole network)"))
    lb = c.tables.get("layer_bit") or []
    layers = bit_layers(ctx)
    if lb and layers:
        chosen = "chosen" if ctx.bit_layers is not None else "highest-CFR"
        blocks.append(render(cfr_bit_per_layer_figure(lb, layers, c.fmt, ctx.label),
                             "cfr_bit_per_layer", f"CFR per bit position of the {chosen} "
                             "layers, one panel per layer (all layers: see the heat map)."))
    return Section("CFR per bit position", blocks)


def bit_layers(ctx: ReportContext) -> list[str]:
    """Layers with their own per-bit panel: ``ctx.bit_layers`` or the
    :data:`BIT_LAYERS_DEFAULT` layers of highest CFR, in network order."""
    c = ctx.campaign
    lb = (c.tables.get("layer_bit") if c else None) or []
    have = set(r["layer"] for r in lb)
    if ctx.bit_layers is not None:
        return ctx.layer_order([n for n in ctx.bit_layers if n in have])
    rows = [r for r in (c.tables.get("layer") if c else None) or []
            if r["layer"] in have and r.get("cfr") is not None and r["cfr"] == r["cfr"]]
    top = sorted(rows, key=lambda r: -float(r["cfr"]))[:BIT_LAYERS_DEFAULT]
    return ctx.layer_order([r["layer"] for r in top])


def _with_field(rows: Sequence[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    form = get_format(fmt)
    out = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "ci"}
        d["ci_low"], d["ci_high"] = (r.get("ci") or [None, None])[:2]
        d.setdefault("field", form.field(int(r["bit"])))
        out.append(d)
    return out


def kernel_layers(ctx: ReportContext) -> list[str]:
    """Layers of the per-kernel figures: ``ctx.kernel_layers`` or the first and last layer
    with per-kernel rows (network order)."""
    rows = (ctx.campaign.tables.get("layer_kernel") if ctx.campaign else None) or []
    have = ctx.layer_order([r["layer"] for r in rows])
    if ctx.kernel_layers is not None:
        return [name for name in ctx.kernel_layers if name in have]
    return list(dict.fromkeys([have[0], have[-1]])) if have else []


@section("CFR per kernel", order=60)
def cfr_kernel(ctx: ReportContext) -> Section | None:
    """Fig. 3/4: CFR per convolution kernel of the first and last layer (or chosen ones)."""
    layers = kernel_layers(ctx)
    if not layers:
        return None
    rows = ctx.campaign.tables["layer_kernel"]
    blocks: list[Any] = [Paragraph(
        "A kernel is one output-channel filter (Conv2d weight axis 0, ConvTranspose2d axis 1, "
        "Linear row). Few faults land in each kernel, so the intervals are wide.")]
    for name in layers:
        mine = sorted((r for r in rows if r["layer"] == name), key=lambda r: int(r["kernel"]))
        key = slug(name)
        blocks.append(render(cfr_kernel_figure(mine, ctx.label(name), _crit(ctx)),
                             f"cfr_kernel_{key}", f"CFR per kernel of {ctx.label(name)}."))
        blocks.append(Table(f"cfr_kernel_{key}", cfr_columns(["layer", "kernel"]),
                            flat_rows(ctx, mine), f"CFR per kernel of {ctx.label(name)}",
                            collapsed=len(mine) > 16))
    return Section("CFR per kernel", blocks)


@section("CFR per layer and bit", order=70)
def cfr_heatmap(ctx: ReportContext) -> Section | None:
    """Heat map layer x bit position."""
    c = ctx.campaign
    rows = (c.tables.get("layer_bit") if c else None) or []
    if not rows:
        return None
    layers = ctx.layer_order([r["layer"] for r in rows])
    fig = render(heatmap_figure(rows, layers, c.fmt, ctx.label), "cfr_layer_bit_heatmap",
                 "CFR (%) per layer (rows, network order) and bit position (columns).")
    pos = {n: i for i, n in enumerate(layers)}
    ordered = sorted(rows, key=lambda r: (pos[r["layer"]], int(r["bit"])))
    return Section("CFR per layer and bit", [fig, Table(
        "cfr_layer_bit", cfr_columns(["layer", "bit"]), flat_rows(ctx, ordered),
        "CFR per layer and bit position", limit=2000, collapsed=True)])
