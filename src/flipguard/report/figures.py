"""Shared figure helpers: Agg backend, style, field colours, PNG + SVG rendering.

Every figure function of :mod:`figures_cfr` / :mod:`figures_detector` returns a matplotlib
figure; :func:`render` turns it into a :class:`~flipguard.report.sections.Figure` block
(PNG bytes embedded in the HTML, SVG text written beside it) and closes it.

>>> fig, ax = new_figure(4, 3)
>>> block = render(fig, "demo", "An empty figure")
>>> block.png[:4], block.svg.lstrip().startswith("<?xml")
(b'\\x89PNG', True)
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flipguard.report.sections import Figure  # noqa: E402

__all__ = ["FIELD_COLOURS", "STYLE", "error_bars", "field_colour", "new_figure", "render"]

STYLE: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "errorbar.capsize": 2,
    "lines.linewidth": 1.2,
    "svg.fonttype": "path",
    "svg.hashsalt": "flipguard",
}
FIELD_COLOURS = {"sign": "#c0392b", "exponent": "#e67e22", "mantissa": "#2e86c1",
                 "magnitude": "#2e86c1"}
BAR_COLOUR = "#2e86c1"
ERR_COLOUR = "#4d5656"
PNG_DPI = 110


def field_colour(name: str) -> str:
    """Colour of a bit field (sign red, exponent orange, mantissa blue; others grey)."""
    return FIELD_COLOURS.get(name, "#7f8c8d")


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1,
               layout: str | None = "constrained", **kw: Any) -> tuple[Any, Any]:
    """``plt.subplots`` under the report style (constrained layout unless ``layout``)."""
    with plt.rc_context(STYLE):
        return plt.subplots(nrows, ncols, figsize=(width, height), layout=layout, **kw)


def render(fig: Any, name: str, caption: str) -> Figure:
    """PNG bytes + SVG text of ``fig`` (deterministic metadata); closes the figure."""
    try:
        with plt.rc_context(STYLE):
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=PNG_DPI, metadata={"Software": None})
            fig.set_layout_engine("none")  # keep the layout computed for the PNG
            svg = io.StringIO()
            fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    finally:
        plt.close(fig)
    return Figure(name, caption, png.getvalue(), svg.getvalue())


def error_bars(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Point values and ``(2, n)`` asymmetric error bars (in %) from rows' ``cfr``/``ci``;
    an undefined rate (no executed fault) gives NaN and no bar."""
    p = np.array([_num(r.get("cfr")) for r in rows], dtype=float) * 100
    lo = np.array([_num((r.get("ci") or [math.nan, math.nan])[0]) for r in rows]) * 100
    hi = np.array([_num((r.get("ci") or [math.nan, math.nan])[1]) for r in rows]) * 100
    err = np.vstack([np.clip(p - lo, 0, None), np.clip(hi - p, 0, None)])
    err[:, ~np.isfinite(p)] = 0.0
    return p, np.nan_to_num(err, nan=0.0)


def _num(v: Any) -> float:
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan
