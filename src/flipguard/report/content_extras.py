"""Sections for results of later stages, read from ``RUN/<name>.json`` when present:

* ``hardening.json`` — the result of ``flipguard harden`` (schema ``flipguard.hardening/2``
  or ``/1``, docs/hardening.md) or a ``HardeningPlan.to_dict()`` (planner estimate only);
* ``ra.json`` (or ``resiliency.json``) — resiliency-accuracy results
  (``flipguard.ra.result_dict`` or a list of them); other scalars and lists of row dicts are
  shown generically (a ``"curve"`` list is also plotted: first numeric column vs the others).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt

from flipguard.report.figures import STYLE, new_figure, render
from flipguard.report.html import fmt_value
from flipguard.report.sections import (
    Column,
    Paragraph,
    ReportContext,
    Section,
    Table,
    section,
)
from flipguard.report.text import flatten, hardening_text, ra_text

__all__ = ["generic_blocks", "hardening", "hardening_text", "ra_text", "resiliency",
           "rows_table"]

PCT_KEYS = ("cfr", "overhead", "improvement", "accuracy", "rate", "drop", "budget", "share")
PCT_EXACT = ("ra", "half_width", "target_margin")


def _kind(key: str, values: Sequence[Any]) -> str:
    nums = [v for v in values if v is not None]
    if not nums or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in nums):
        return "text"
    if all(isinstance(v, int) for v in nums):
        return "int"
    last = key.rsplit(".", 1)[-1]
    return "pct" if last in PCT_EXACT or any(p in last for p in PCT_KEYS) else "float"


def rows_table(name: str, rows: Sequence[dict[str, Any]], caption: str) -> Table:
    """A table over the union of the rows' keys (kinds inferred; ``*cfr*``/``*overhead*``
    columns shown in %)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cols = []
    for k in keys:
        kind = _kind(k, [r.get(k) for r in rows])
        cols.append(Column(k, f"{k} (%)" if kind == "pct" else k, kind))
    clean = [{k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
              for k, v in r.items()} for r in rows]
    return Table(name, cols, clean, caption, limit=500, collapsed=len(rows) > 30)


def _curve_figure(rows: Sequence[dict[str, Any]], title: str) -> Any | None:
    """First numeric column (x) against the other percentage columns (or, if none, the
    other float columns)."""
    kinds = {k: _kind(k, [r.get(k) for r in rows]) for k in rows[0]}
    nums = [k for k, kd in kinds.items() if kd in ("pct", "float", "int")]
    if len(nums) < 2:
        return None
    x, rest = nums[0], nums[1:]
    ys = [k for k in rest if kinds[k] == "pct"] or [k for k in rest if kinds[k] == "float"]
    if not ys:
        return None
    rows = [r for r in rows if r.get(x) is not None]
    sx = 100 if kinds[x] == "pct" else 1
    with plt.rc_context(STYLE):
        fig, ax = new_figure(6.0, 3.8)
        for y in ys:
            sy = 100 if kinds[y] == "pct" else 1
            pts = [(r[x] * sx, r[y] * sy) for r in rows if r.get(y) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=y)
        ax.set_xlabel(x + (" (%)" if sx == 100 else ""))
        ax.set_ylabel("%" if kinds[ys[0]] == "pct" else "")
        ax.set_title(title)
        ax.legend()
    return fig


def _hardening_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Expected CFR after hardening vs memory budget (``improvement_curve`` rows)."""
    rows = sorted(rows, key=lambda r: float(r["budget"]))
    with plt.rc_context(STYLE):
        fig, ax = new_figure(6.0, 3.8)
        ax.plot([100 * r["budget"] for r in rows],
                [100 * r["expected_cfr_after"] for r in rows], marker="o",
                color="#2e86c1", label="expected CFR after hardening")
        ax.axhline(100 * float(rows[0]["expected_cfr_before"]), color="#c0392b", ls="--",
                   label="CFR without hardening")
        ax.set_xlabel("memory budget (% of the weight memory)")
        ax.set_xlim(left=0)
        ax.set_ylabel("expected CFR (%)")
        ax.set_ylim(bottom=0)
        ax.set_title("Expected CFR vs memory budget")
        ax.legend()
    return fig


def _scalar(key: str, v: Any) -> str:
    if key.endswith("created") and isinstance(v, (int, float)) and not isinstance(v, bool):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(v))
    if _kind(key, [v]) == "pct":
        return f"{fmt_value(v, 'pct')} %"
    return fmt_value(v, _kind(key, [v]))


def generic_blocks(name: str, data: Any, what: str) -> list[Any]:
    """Blocks for a JSON result: scalars (nested dicts flattened to dotted keys) as one
    key/value table, each top-level list of row dicts as a table (``curve`` also plotted)."""
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict):
        return [Paragraph(f"{what}: {fmt_value(data)}")]
    blocks: list[Any] = []
    scalars = [{"key": k, "value": _scalar(k, v)} for k, v in flatten(data)
               if not (isinstance(v, list) and v and all(isinstance(r, dict) for r in v))]
    if scalars:
        blocks.append(Table(f"{name}_summary", [Column("key", "item"), Column("value", "value")],
                            scalars, f"{what}: summary"))
    for key, v in data.items():
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            if key == "curve":
                fig = _curve_figure(v, f"{what}: {key}")
                if fig is not None:
                    blocks.append(render(fig, f"{name}_{key}", f"{what}: {key}."))
            blocks.append(rows_table(f"{name}_{key}", v, f"{what}: {key}"))
    return blocks


def _pair_rows(d: dict[str, Any], key: str, value: str) -> list[dict[str, Any]]:
    return [{key: k, value: v} for k, v in d.items()]


@section("Hardening", order=80)
def hardening(ctx: ReportContext) -> Section | None:
    """Protections chosen under the memory budget, the measured and expected improvement
    (``RUN/hardening.json``, schema ``flipguard.hardening/2``): the weighted paired
    comparison, what each protection covers and, when measured, the exposure view."""
    h = ctx.extras.get("hardening")
    withheld = ctx.withheld_note("hardening")
    if withheld is not None:
        return Section("Hardening", [withheld])
    if h is None:
        return None
    if not isinstance(h, dict):
        return Section("Hardening", generic_blocks("hardening", h, "Hardening"))
    blocks: list[Any] = []
    text = hardening_text(h)
    if text:
        blocks.append(Paragraph(text))
    rest = dict(h)
    b, a = rest.pop("cfr_before", None), rest.pop("cfr_after", None)
    if isinstance(b, dict) and isinstance(a, dict):
        rows = [{"model": name, "n": d.get("n"), "critical": d.get("critical"),
                 "cfr": d.get("cfr"), "ci_low": (d.get("ci") or [None, None])[0],
                 "ci_high": (d.get("ci") or [None, None])[1]}
                for name, d in (("unprotected", b), ("hardened", a))]
        blocks.append(Table("hardening_measured", [
            Column("model", "model"), Column("n", "faults", "int"),
            Column("critical", "critical", "int"), Column("cfr", "CFR (%)", "pct"),
            Column("ci_low", "CI low (%)", "pct"), Column("ci_high", "CI high (%)", "pct")],
            rows, "Measured CFR before and after hardening (same faults)"))
    statuses = rest.pop("statuses", None)
    if isinstance(statuses, dict) and statuses:
        blocks.append(Table("hardening_statuses", [Column("status", "status"),
                                                   Column("faults", "faults", "int")],
                            _pair_rows(statuses, "status", "faults"),
                            "What the protected hardware delivered per fault"))
    ff = rest.pop("fault_free", None)
    if isinstance(ff, dict) and isinstance(ff.get("before"), dict):
        rows = [{"model": m, **ff[k]} for m, k in (("unprotected", "before"),
                                                   ("hardened", "after")) if k in ff]
        blocks.append(rows_table("hardening_fault_free", rows,
                                 "Fault-free metrics (hardening must not change them)"))
    clamps = rest.pop("activation_clamps", None)
    if isinstance(clamps, dict) and isinstance(clamps.get("layers"), dict):
        blocks.append(rows_table("hardening_clamps", [
            {"layer": n, "lo": v[0], "hi": v[1]} for n, v in clamps["layers"].items()],
            "Activation clamps"))
    cov = rest.pop("coverage", None)
    if isinstance(cov, list) and cov:
        blocks.append(Table("hardening_coverage", [
            Column("scheme", "scheme"), Column("locations", "covers"),
            Column("not_covered", "not covered"), Column("effect", "effect"),
            Column("memory_bits", "memory bits", "int"),
            Column("protected_words", "protected words", "int"),
            Column("per_load", "read-path cost per load")],
            [{**c, "locations": ", ".join(c.get("locations", [])),
              "not_covered": ", ".join(c.get("not_covered", [])) or "-"} for c in cov],
            "Fault locations each protection covers (storage / datapath / registers), its "
            "memory bits and its read-path cost"))
    ex = rest.pop("exposure", None)
    if isinstance(ex, dict):
        rows = [{"target": t, "location": loc, "share": v}
                for t, d in (ex.get("locations") or {}).items() for loc, v in d.items()]
        if rows:
            blocks.append(Table("hardening_exposure_locations", [
                Column("target", "target"), Column("location", "location"),
                Column("share", "share of the exposure (%)", "pct")], rows,
                f"Exposure ({ex.get('hardware')}) by fault location"))
        whole = ex.get("whole_exposure") or {}
        rng = whole.get("relative_improvement_range") or [None, None]
        blocks.append(Table("hardening_exposure", [
            Column("item", "item"), Column("value", "value (%)", "pct")], [
            {"item": "measured share of the exposure", "value": ex.get("measured_share")},
            {"item": "share in locations the protections cover", "value":
             ex.get("covered_share")},
            {"item": "CFR before (exposure-weighted)", "value": ex.get("cfr_before")},
            {"item": "CFR after (exposure-weighted)", "value": ex.get("cfr_after")},
            {"item": "improvement over the measured exposure",
             "value": ex.get("relative_improvement")},
            {"item": "improvement if every fault were in storage",
             "value": ex.get("relative_improvement_if_all_storage")},
            {"item": "whole exposure, unmeasured share at the same CFR",
             "value": whole.get("relative_improvement_if_same_cfr")},
            {"item": "whole exposure, lowest (unmeasured share all critical)",
             "value": rng[0]}],
            "Hardening over the hardware exposure (faults outside the covered locations "
            "are not removed)"))
    curve = rest.pop("curve", None)
    rest.pop("protections", None)  # same facts as "table"
    blocks += generic_blocks("hardening", rest, "Hardening")
    if isinstance(curve, list) and curve and all(
            isinstance(r, dict) and {"budget", "expected_cfr_before", "expected_cfr_after"}
            <= set(r) for r in curve):
        blocks.append(render(_hardening_figure(curve), "hardening_curve",
                             "Expected CFR after hardening vs memory budget (the protections "
                             "chosen for each budget; overheads in the table)."))
        blocks.append(rows_table("hardening_curve", curve, "Hardening: improvement curve"))
    return Section("Hardening", blocks)


@section("Resiliency and accuracy", order=90)
def resiliency(ctx: ReportContext) -> Section | None:
    """Resiliency-accuracy results (``RUN/ra.json`` or ``RUN/resiliency.json``: one
    ``flipguard.ra.result_dict`` or a list of them)."""
    r = ctx.extras.get("resiliency")
    withheld = ctx.withheld_note("resiliency")
    if withheld is not None:
        return Section("Resiliency and accuracy", [withheld])
    if r is None:
        return None
    items = r if isinstance(r, list) and all(isinstance(x, dict) for x in r) else [r]
    blocks: list[Any] = []
    if len(items) > 1:
        keys = ("hardware", "estimator", "ra", "golden_accuracy", "accuracy_drop", "samples")
        blocks.append(rows_table("resiliency_results", [{k: x.get(k) for k in keys}
                                                        for x in items],
                                 "Resiliency-accuracy results"))
    for i, x in enumerate(items):
        name = "resiliency" if len(items) == 1 else f"resiliency_{i + 1}"
        if not isinstance(x, dict):
            blocks += generic_blocks(name, x, "Resiliency-accuracy")
            continue
        text = ra_text(x)
        if text:
            blocks.append(Paragraph(text))
        rest = dict(x)
        for key, label in (("exposure_by_layer", "layer"), ("exposure_share", "target")):
            d = rest.pop(key, None)
            if isinstance(d, dict) and d:
                blocks.append(rows_table(f"{name}_{key}", _pair_rows(d, label, "share"),
                                         f"Fault exposure share per {label}"))
        blocks += generic_blocks(name, rest, "Resiliency-accuracy")
    return Section("Resiliency and accuracy", blocks)
