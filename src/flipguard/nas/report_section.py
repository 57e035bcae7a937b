"""Report section of a resilience-aware architecture search (``flipguard nas``).

:func:`nas_section` turns the ``nas.json`` document into a section (what was searched, the
front with its figure and table, dominance of the baseline, uniform vs hardware-aware
rankings); ``flipguard nas`` writes it as ``OUT/report.html``. Registered as the report
section "Architecture search": a run report shows it when ``ctx.extras["nas"]`` holds such a
document.

>>> doc = {"config": {"hardware": "systolic", "objectives": ["quality", "ra"], "trials": 2},
...        "studies": {}, "final": [], "baseline": None, "final_front": []}
>>> nas_section(doc).title
'Architecture search'
"""

from __future__ import annotations

from typing import Any

from flipguard.nas.front_view import front_figure, front_rows
from flipguard.report.content_extras import rows_table
from flipguard.report.figures import render
from flipguard.report.sections import Note, Paragraph, ReportContext, Section, section

__all__ = ["nas_section"]

TITLE = "Architecture search"


def _hardware(doc: dict[str, Any]) -> list[str]:
    cfg = doc.get("config") or {}
    hws = list((cfg.get("settings") or {}).get("hardware") or [])
    return hws or [str(cfg.get("hardware", "uniform"))]


def _ranking_text(r: dict[str, Any], level: str, hw: str) -> str:
    def tau(d: dict[str, Any]) -> str:
        return "n/a" if d.get("tau") is None else f"{d['tau']:.3f} (p = {d['p_value']:.2g})"

    diff = r.get("uniform_minus_hardware_ra") or {}
    text = (f"{level}: {r.get('networks', 0)} networks; Kendall tau between the RA rankings "
            f"under uniform and {hw} exposure {tau(r.get('ra', {}))}, between the accuracy-"
            f"drop rankings {tau(r.get('drop', {}))}")
    if diff.get("mean") is not None:
        text += (f"; uniform RA minus {hw} RA: mean {diff['mean']:+.5f}, positive for "
                 f"{diff['share_positive']:.0%} of the networks")
    return text + "."


def nas_section(doc: dict[str, Any]) -> Section:
    """The section of one search document (see :mod:`flipguard.nas.output`)."""

    cfg = doc.get("config") or {}
    hws = _hardware(doc)
    hw = str(cfg.get("hardware", hws[0]))
    blocks: list[Any] = []
    studies = doc.get("studies") or {}
    text = (f"Objectives {', '.join(cfg.get('objectives', []))} on validation data (normal "
            f"held-out training images and synthetic defects pasted onto them; no test "
            f"label), {cfg.get('sampler', 'tpe')} sampler, {cfg.get('trials')} trials per "
            f"study, space {cfg.get('space', '')!r}.")
    blocks.append(Paragraph(text))
    for name, s in studies.items():
        blocks.append(Paragraph(f"Study {name} ({s.get('hardware')} exposure): "
                                f"{s.get('complete', 0)} complete trials, "
                                f"{len(s.get('front', []))} on its screening front, "
                                f"{len(s.get('retrained', []))} retrained."))
    if doc.get("final") or doc.get("baseline") or doc.get("screened"):
        blocks.append(render(front_figure(doc, hws), "nas_front",
                             "Quality vs RA per exposure model; colour = log10 parameter "
                             "bits; large markers: retrained (RA interval as bars, thick "
                             "edge: on the final front), X: baseline."))
    rows = [{k: (f"[{v[0]:.4f}, {v[1]:.4f}]" if k.endswith("_ci") and isinstance(v, list)
                 else v) for k, v in r.items()} for r in front_rows(doc, hws)]
    if rows:
        blocks.append(rows_table("nas_front", rows, "Retrained networks (validation "
                                 "objectives, test metrics)"))
    base = doc.get("baseline")
    if base:
        dom = doc.get("dominates_baseline") or []
        sig = doc.get("dominates_baseline_significant") or []
        msg = (f"{len(dom)} retrained network(s) have quality >= the {base.get('name')}'s, "
               f"higher RA under {hw} and no more parameter bits ({len(sig)} with the RA "
               f"interval entirely above the baseline's)."
               if dom else f"No retrained network dominates the {base.get('name')} "
               f"(quality >=, RA under {hw} higher, memory <=).")
        blocks.append(Note(msg, "info"))
    for level, r in (doc.get("rankings") or {}).items():
        blocks.append(Paragraph(_ranking_text(r, f"Ranking agreement ({level})", hw)))
    return Section(TITLE, blocks)


@section(TITLE, order=95)
def architecture_search(ctx: ReportContext) -> Section | None:
    """The search section when ``ctx.extras["nas"]`` holds a ``nas.json`` document."""
    doc = ctx.extras.get("nas")
    if not isinstance(doc, dict):
        return None
    return nas_section(doc)
