"""The calibration section: predicted vs observed criticality of the executed campaign faults.

``ctx.extras["calibration"]`` (filled by :func:`flipguard.study.reports.calibration_data`)
is a dict with ``criterion``, ``confidence``, ``source`` (``"predictor"``: a uniform
campaign's faults classified by the run's cached criticality predictor; ``"substrata"``: the
classes of a criticality-stratified plan) and ``rows`` of
``flipguard.study.predictors.calibration_table``; or ``error`` (a one-line reason) when
the predictor could not be built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flipguard.report.figures import render
from flipguard.report.figures_criticality import calibration_figure, calibration_points
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

__all__ = ["CALIBRATION_COLUMNS", "TITLE", "calibration", "calibration_rows",
           "calibration_text"]

TITLE = "Predicted vs observed criticality"
CALIBRATION_COLUMNS = (
    Column("label", "predicted class"), Column("class", "class", "int"),
    Column("predicted", "predicted P(critical) (%)", "pct"),
    Column("n", "executed n", "int"), Column("critical", "critical", "int"),
    Column("observed", "observed rate (%)", "pct"), Column("ci_low", "CI low (%)", "pct"),
    Column("ci_high", "CI high (%)", "pct"))
SOURCES = {
    "predictor": "the executed faults of the (uniform) campaign classified by the run's "
                 "criticality predictor (cached in RUN/criticality/)",
    "substrata": "the predicted classes of the criticality-stratified plan's sub-strata",
}


def calibration_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table rows: ``ci`` split into ``ci_low``/``ci_high``."""
    out = []
    for r in rows:
        d = {k: v for k, v in r.items() if k != "ci"}
        ci = r.get("ci") or [None, None]
        d["ci_low"], d["ci_high"] = ci[0], ci[1]
        out.append(d)
    return out


def _pct(v: Any) -> str:
    return f"{fmt_value(v, 'pct')} %"


def calibration_text(rows: Sequence[dict[str, Any]]) -> str:
    """Which classes' priors fall outside the interval of their observed rate.

    >>> calibration_text([{"label": "low", "predicted": 0.02, "n": 100, "critical": 10,
    ...                    "observed": 0.1, "ci": [0.055, 0.174]}])
    'Prior outside the observed interval: low 10 % (5.5–17.4 %) vs 2 % predicted.'
    """
    pts = calibration_points(rows)
    if not pts:
        return "No executed fault has a predicted class yet."
    off = [r for r in pts if r.get("ci") and r["ci"][0] is not None
           and not r["ci"][0] <= float(r["predicted"]) <= r["ci"][1]]
    if not off:
        return ("Every class prior lies inside the interval of its observed rate: no "
                "evidence of miscalibration at this sample size.")
    return "Prior outside the observed interval: " + "; ".join(
        f"{r['label']} {_pct(r['observed'])} ({fmt_value(r['ci'][0], 'pct')}–"
        f"{fmt_value(r['ci'][1], 'pct')} %) vs {_pct(r['predicted'])} predicted"
        for r in off) + "."


@section(TITLE, order=75)
def calibration(ctx: ReportContext) -> Section | None:
    """Observed critical rate per predicted criticality class against the class prior
    (figure + table); absent when there are no classified campaign results."""
    data = ctx.extras.get("calibration")
    if not isinstance(data, dict):
        return None
    if data.get("error"):
        return Section(TITLE, [Note("Calibration of the criticality predictor omitted: "
                                    f"{data['error']}")])
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        return None
    conf = data.get("confidence")
    level = f"{100 * float(conf):g} % " if conf is not None else ""
    crit = data.get("criterion") or ""
    source = SOURCES.get(str(data.get("source")), "the executed campaign faults")
    blocks: list[Any] = [Paragraph(
        f"How well the criticality predictor's classes anticipate the campaign: for "
        f"{source}, the observed rate of critical faults ({crit}) per predicted class "
        f"against the class prior, with {level}Wilson intervals. Points on the diagonal are "
        "calibrated; above it the predictor underestimates the class's criticality. In a "
        "criticality-stratified campaign a miscalibrated class costs precision, never "
        "correctness (every class is audited; docs/criticality.md)."),
        Paragraph(calibration_text(rows))]
    if calibration_points(rows):
        blocks.append(render(calibration_figure(rows, crit, conf), "criticality_calibration",
                             "Observed critical rate per predicted class (whiskers: "
                             f"{level}Wilson interval; labels: executed faults n and critical "
                             "k) against the class prior; dashed: observed = predicted."))
    blocks.append(Table("criticality_calibration", list(CALIBRATION_COLUMNS),
                        calibration_rows(rows),
                        f"Predicted vs observed criticality per class ({crit})"))
    return Section(TITLE, blocks)
