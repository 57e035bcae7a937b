"""CFR figures from analysis rows: per layer, per bit (field-coloured), per kernel, layer x bit.

Inputs are the row dicts of ``flipguard.campaign.analysis.cfr_table`` (``cfr`` and ``ci`` as
fractions); figures show percentages with the confidence intervals as error bars.

>>> rows = [{"layer": "encoder.0", "cfr": 0.1, "ci": [0.05, 0.2], "n": 50}]
>>> fig = cfr_layer_figure(rows, label=lambda name: f"{name} (Conv2d)")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from flipguard.faults import get_format
from flipguard.report.figures import (
    BAR_COLOUR,
    ERR_COLOUR,
    STYLE,
    error_bars,
    field_colour,
    new_figure,
)

__all__ = ["cfr_bit_figure", "cfr_bit_per_layer_figure", "cfr_kernel_figure",
           "cfr_layer_figure", "heatmap_figure"]

Rows = Sequence[dict[str, Any]]


def _ylabel(ax: Any, criterion: str) -> None:
    ax.set_ylabel("CFR (%)" + (f" — {criterion}" if criterion and len(criterion) < 24 else ""))


def cfr_layer_figure(rows: Rows, label: Callable[[str], str] = str,
                     criterion: str = "") -> Any:
    """Fig. 1: horizontal bars of CFR per layer in the given (network) order, top to bottom."""
    p, err = error_bars(rows)
    names = [label(r["layer"]) for r in rows]
    with plt.rc_context(STYLE):
        fig, ax = new_figure(7.5, 1.2 + 0.38 * max(len(rows), 1))
        y = np.arange(len(rows))
        ax.barh(y, np.nan_to_num(p), xerr=err, color=BAR_COLOUR, ecolor=ERR_COLOUR,
                capsize=3, height=0.65)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("critical-fault rate CFR (%)" + (f" — {criterion}" if criterion else ""))
        ax.set_title("CFR per layer (bars: estimate, whiskers: confidence interval)")
        ax.set_xlim(left=0)
        ax.grid(axis="y", visible=False)
    return fig


def _field_legend(ax: Any, fields: Sequence[str]) -> None:
    ax.legend(handles=[Patch(color=field_colour(f), label=f) for f in fields],
              loc="upper left", frameon=False)


def cfr_bit_figure(rows: Rows, fmt: str = "fp32", title: str = "CFR per bit position",
                   criterion: str = "") -> Any:
    """Fig. 2: CFR per bit position 0..bits-1, bars coloured by field (sign/exponent/mantissa).
    Bits absent from ``rows`` stay empty."""
    form = get_format(fmt)
    by_bit = {int(r["bit"]): r for r in rows}
    bits = list(range(form.bits))
    full = [by_bit.get(b, {"cfr": None, "ci": None}) for b in bits]
    p, err = error_bars(full)
    with plt.rc_context(STYLE):
        fig, ax = new_figure(9.0, 3.8)
        ax.bar(bits, np.nan_to_num(p), yerr=err, color=[field_colour(form.field(b)) for b in bits],
               ecolor=ERR_COLOUR, capsize=2, width=0.75)
        ax.set_xticks(bits, [str(b) for b in bits], fontsize=8)
        ax.set_xlim(-0.8, form.bits - 0.2)
        ax.set_xlabel(f"bit position ({fmt}; 0 = least significant)")
        _ylabel(ax, criterion)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(axis="x", visible=False)
        _field_legend(ax, form.fields)
    return fig


def cfr_bit_per_layer_figure(rows: Rows, layers: Sequence[str], fmt: str = "fp32",
                             label: Callable[[str], str] = str) -> Any:
    """Fig. 2b: one small bit-position panel per layer (shared CFR axis)."""
    form = get_format(fmt)
    ncols = 2 if len(layers) > 1 else 1
    nrows = math.ceil(len(layers) / ncols)
    bits = np.arange(form.bits)
    colours = [field_colour(form.field(int(b))) for b in bits]
    with plt.rc_context(STYLE):
        fig, axes = new_figure(10.0, 0.4 + 2.1 * nrows, nrows, ncols, sharey=True,
                               squeeze=False)
        for ax, layer in zip(axes.flat, layers, strict=False):
            mine = {int(r["bit"]): r for r in rows if r["layer"] == layer}
            p, err = error_bars([mine.get(int(b), {"cfr": None}) for b in bits])
            ax.bar(bits, np.nan_to_num(p), yerr=err, color=colours, ecolor=ERR_COLOUR,
                   capsize=1, width=0.75)
            ax.set_title(label(layer), fontsize=10)
            ax.set_xticks(bits[::4], [str(b) for b in bits[::4]])
            ax.set_ylabel("CFR (%)")
            ax.set_ylim(bottom=0)
            ax.grid(axis="x", visible=False)
        for ax in list(axes.flat)[len(layers):]:
            ax.set_visible(False)
        fig.supxlabel("bit position")
    return fig


def cfr_kernel_figure(rows: Rows, layer_label: str, criterion: str = "") -> Any:
    """Fig. 3/4: CFR per convolution kernel (output-channel filter) of one layer."""
    rows = sorted(rows, key=lambda r: int(r["kernel"]))
    p, err = error_bars(rows)
    kernels = [int(r["kernel"]) for r in rows]
    with plt.rc_context(STYLE):
        fig, ax = new_figure(max(5.0, min(12.0, 2.5 + 0.22 * len(rows))), 3.6)
        x = np.arange(len(rows))
        ax.bar(x, np.nan_to_num(p), yerr=err, color=BAR_COLOUR, ecolor=ERR_COLOUR,
               capsize=2, width=0.7)
        step = max(1, len(rows) // 32)
        ax.set_xticks(x[::step], [str(k) for k in kernels[::step]])
        ax.set_xlabel("kernel (output-channel filter)")
        _ylabel(ax, criterion)
        ax.set_ylim(bottom=0)
        ax.set_title(f"CFR per kernel of {layer_label}")
        ax.grid(axis="x", visible=False)
    return fig


def heatmap_figure(rows: Rows, layers: Sequence[str], fmt: str = "fp32",
                   label: Callable[[str], str] = str) -> Any:
    """Heat map of CFR (%) over layer (rows, network order) x bit position (columns);
    cells without executed faults are grey."""
    form = get_format(fmt)
    grid = np.full((len(layers), form.bits), np.nan)
    pos = {name: i for i, name in enumerate(layers)}
    for r in rows:
        if r["layer"] in pos and r.get("cfr") is not None:
            grid[pos[r["layer"]], int(r["bit"])] = float(r["cfr"]) * 100
    with plt.rc_context(STYLE):
        fig, ax = new_figure(10.0, 1.6 + 0.42 * max(len(layers), 1))
        cmap = plt.get_cmap("magma_r").with_extremes(bad="#d5d8dc")
        vmax = np.nanmax(grid) if np.isfinite(grid).any() else 0.0
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0,
                       vmax=vmax if vmax > 0 else 1.0, interpolation="nearest")
        ax.set_yticks(np.arange(len(layers)), [label(n) for n in layers])
        ax.set_xticks(np.arange(form.bits), [str(b) for b in range(form.bits)], fontsize=8)
        ax.set_xlabel("bit position")
        ax.set_title("CFR (%) per layer and bit position (grey: no fault executed)")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="CFR (%)", shrink=0.9)
    return fig
