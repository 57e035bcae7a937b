"""Figures across objects (categories) of a study: the same network trained per object, its
CFR per layer and per bit as the mean over objects with their spread, each object a marker,
and the per-kernel CFR of a layer as an objects × kernels heat map.

Inputs: ``{object: rows}`` with the row dicts of ``cfr_table`` (``cfr``/``ci`` fractions).

>>> rows = {"a": [{"layer": "l0", "cfr": 0.1}, {"layer": "l1", "cfr": 0.0}],
...         "b": [{"layer": "l0", "cfr": 0.3}, {"layer": "l1", "cfr": 0.1}]}
>>> fig = study_layer_figure(rows)
>>> [round(float(v), 3) for v in spread(rows, "layer")["mean"]]
[0.2, 0.05]
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from flipguard.faults import get_format
from flipguard.report.figures import BAR_COLOUR, ERR_COLOUR, STYLE, field_colour, new_figure

__all__ = ["spread", "study_bit_figure", "study_kernel_figure", "study_layer_figure"]

Rows = Sequence[dict[str, Any]]
MARKERS = "os^Dv<>pP*hX"


def spread(per_object: Mapping[str, Rows], key: str) -> dict[str, Any]:
    """Keys in first-seen order, and per key the mean, min, max and std of the objects'
    CFR (objects without that key are left out of its statistics)."""
    keys: list[Any] = []
    for rows in per_object.values():
        for r in rows:
            if r.get(key) is not None and r[key] not in keys:
                keys.append(r[key])
    grid = np.full((len(per_object), len(keys)), np.nan)
    for i, rows in enumerate(per_object.values()):
        for r in rows:
            if r.get(key) in keys and r.get("cfr") is not None:
                grid[i, keys.index(r[key])] = float(r["cfr"])
    with warnings.catch_warnings():  # a key no object has: NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        stats = {"mean": np.nanmean(grid, 0), "min": np.nanmin(grid, 0),
                 "max": np.nanmax(grid, 0), "std": np.nanstd(grid, 0)}
    return {"keys": keys, "grid": grid, **stats}


def _objects(ax: Any, x: np.ndarray, grid: np.ndarray, names: Sequence[str],
             horizontal: bool) -> None:
    for i, name in enumerate(names):
        v = grid[i] * 100
        pts = (v, x) if horizontal else (x, v)
        ax.scatter(*pts, s=18, marker=MARKERS[i % len(MARKERS)], label=name, zorder=3,
                   alpha=0.85)


def study_layer_figure(per_object: Mapping[str, Rows], criterion: str = "") -> Any:
    """CFR per layer: bar = mean over objects, whisker = min–max, markers = objects."""
    s = spread(per_object, "layer")
    y = np.arange(len(s["keys"]))
    mean = np.nan_to_num(s["mean"]) * 100
    err = np.nan_to_num(np.vstack([s["mean"] - s["min"], s["max"] - s["mean"]])) * 100
    with plt.rc_context(STYLE):
        fig, ax = new_figure(7.5, 1.4 + 0.38 * max(len(y), 1))
        ax.barh(y, mean, xerr=err, color=BAR_COLOUR, ecolor=ERR_COLOUR, alpha=0.55,
                capsize=3, height=0.65)
        _objects(ax, y, s["grid"], list(per_object), horizontal=True)
        ax.set_yticks(y, [str(k) for k in s["keys"]])
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.set_xlabel("CFR (%)" + (f" — {criterion}" if criterion else ""))
        ax.set_title("CFR per layer across objects (bar: mean, whiskers: min–max)")
        ax.legend(loc="lower right", frameon=False, fontsize=8)
        ax.grid(axis="y", visible=False)
    return fig


def study_bit_figure(per_object: Mapping[str, Rows], fmt: str = "fp32",
                     criterion: str = "") -> Any:
    """CFR per bit position across objects: field-coloured mean bars, min–max whiskers."""
    form = get_format(fmt)
    s = spread(per_object, "bit")
    bits = np.arange(form.bits)
    idx = {int(k): j for j, k in enumerate(s["keys"])}
    pick = np.array([idx.get(int(b), -1) for b in bits])
    have = pick >= 0

    def col(a: np.ndarray) -> np.ndarray:
        out = np.full(bits.size, np.nan)
        out[have] = a[pick[have]]
        return out

    mean, lo, hi = col(s["mean"]), col(s["min"]), col(s["max"])
    grid = np.full((len(per_object), bits.size), np.nan)
    grid[:, have] = s["grid"][:, pick[have]]
    with plt.rc_context(STYLE):
        fig, ax = new_figure(9.0, 3.8)
        ax.bar(bits, np.nan_to_num(mean) * 100,
               yerr=np.nan_to_num(np.vstack([mean - lo, hi - mean])) * 100,
               color=[field_colour(form.field(int(b))) for b in bits], ecolor=ERR_COLOUR,
               alpha=0.6, capsize=2, width=0.75)
        _objects(ax, bits.astype(float), grid, list(per_object), horizontal=False)
        ax.set_xticks(bits, [str(b) for b in bits], fontsize=8)
        ax.set_xlabel(f"bit position ({fmt}; 0 = least significant)")
        ax.set_ylabel("CFR (%)" + (f" — {criterion}" if criterion else ""))
        ax.set_ylim(bottom=0)
        ax.set_title("CFR per bit across objects (bar: mean, whiskers: min–max)")
        ax.legend(loc="upper left", frameon=False, fontsize=8)
        ax.grid(axis="x", visible=False)
    return fig


def study_kernel_figure(per_object: Mapping[str, Rows], layer: str) -> Any:
    """Objects × kernels heat map of the CFR (%) of ``layer``'s kernels."""
    rows = {o: [r for r in rs if r.get("layer") == layer] for o, rs in per_object.items()}
    s = spread(rows, "kernel")
    order = np.argsort([int(k) for k in s["keys"]]) if s["keys"] else np.array([], int)
    grid = s["grid"][:, order] * 100
    kernels = [int(s["keys"][j]) for j in order]
    with plt.rc_context(STYLE):
        fig, ax = new_figure(max(5.0, min(12.0, 2.5 + 0.2 * len(kernels))),
                             1.4 + 0.45 * max(len(per_object), 1))
        masked = np.ma.masked_invalid(grid)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#d5d8dc")
        im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=0,
                       vmax=max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0,
                                1e-9))
        ax.set_yticks(range(len(per_object)), list(per_object))
        step = max(1, len(kernels) // 32)
        ax.set_xticks(range(0, len(kernels), step), [str(k) for k in kernels[::step]])
        ax.set_xlabel("kernel (output-channel filter)")
        ax.set_title(f"CFR per kernel of {layer} across objects")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="CFR (%)")
    return fig
