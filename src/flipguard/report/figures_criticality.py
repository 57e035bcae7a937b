"""Calibration figure of the criticality predictor: predicted class prior vs observed rate.

Input rows are those of ``flipguard.study.predictors.calibration_table`` (``predicted``,
``n``, ``critical``, ``observed`` and its ``ci`` as fractions). Both axes are logarithmic
(the priors span 0.2 % to 95 %); a class with no critical fault is drawn at the axis floor
(open marker) with its upper interval bound.

>>> rows = [{"label": "low", "predicted": 0.02, "n": 50, "critical": 2, "observed": 0.04,
...          "ci": [0.011, 0.135]}]
>>> fig = calibration_figure(rows)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from flipguard.report.figures import BAR_COLOUR, ERR_COLOUR, STYLE, new_figure

__all__ = ["calibration_figure", "calibration_points"]


def calibration_points(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with executed faults (``n > 0`` and a defined ``observed`` rate)."""
    return [r for r in rows if int(r.get("n") or 0) > 0 and r.get("observed") is not None]


def _floor(pts: Sequence[dict[str, Any]]) -> float:
    """Lower end of the log axes: half the smallest positive prior, rate or interval bound."""
    vals = [float(v) for r in pts
            for v in (r["predicted"], r["observed"], *(r.get("ci") or ()))
            if v is not None and float(v) > 0]
    return 0.5 * min(vals) if vals else 1e-3


def calibration_figure(rows: Sequence[dict[str, Any]], criterion: str = "",
                       confidence: float | None = None) -> Any:
    """Observed critical rate (Wilson interval as error bars) against the predicted class
    prior, one point per class with executed faults, annotated with ``n``; the diagonal
    ``observed = predicted`` is a perfectly calibrated predictor."""
    pts = calibration_points(rows)
    lo_lim = _floor(pts)
    level = f"{100 * confidence:g} % " if confidence else ""
    with plt.rc_context(STYLE):
        fig, ax = new_figure(6.4, 5.0)
        ax.plot([lo_lim, 1.0], [lo_lim, 1.0], ls="--", color="#7f8c8d",
                label="calibrated (observed = predicted)")
        first = next((i for i, r in enumerate(pts) if float(r["observed"]) > 0), 0)
        for i, r in enumerate(pts):
            x, p = float(r["predicted"]), float(r["observed"])
            ci = r.get("ci") or [p, p]
            lo = max(float(ci[0]) if ci[0] is not None else p, lo_lim)
            hi = float(ci[1]) if ci[1] is not None else p
            y = max(p, lo_lim)
            zero = p <= 0
            ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], fmt="o",
                        color=BAR_COLOUR, ecolor=ERR_COLOUR, capsize=3, markersize=6,
                        markerfacecolor="white" if zero else BAR_COLOUR,
                        label=f"observed rate ({level}Wilson interval)" if i == first else None)
            name = r.get("label", r.get("class", ""))
            ax.annotate(f"{name}\nn={int(r['n']):,}, k={int(r['critical']):,}", (x, y),
                        xytext=(6, 4 if zero else -4), textcoords="offset points",
                        fontsize=8, va="bottom" if zero else "top")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo_lim / 1.3, 1.6)  # same range on both axes: the diagonal at 45°
        ax.set_ylim(lo_lim / 1.3, 1.6)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g} %"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("predicted P(critical) — class prior")
        ax.set_ylabel("observed critical rate"
                      + (f" — {criterion}" if criterion and len(criterion) < 24 else ""))
        ax.set_title("Predicted vs observed criticality per predicted class")
        handles, labels = ax.get_legend_handles_labels()
        if any(float(r["observed"]) <= 0 for r in pts):
            handles.append(Line2D([], [], ls="none", marker="o", color=BAR_COLOUR,
                                  markerfacecolor="white", markersize=6))
            labels.append("no critical fault (drawn at the axis floor)")
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
                  frameon=False)
    return fig
